"""The registry of preference objectives, their options, and the one entry point the engine calls.

Adding a loss = one function (pairwise.py / aot.py / kto.py or a new module) + one `LossSpec` below.
Options with a scalar type (float / str) become CLI flags (`--label-smoothing` ...) through
`add_loss_arguments`; tensor options (KTO's KL log-probs) are passed by the engine.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.losses.aot import COSTS, SORTS, aot_loss, aot_unpaired_loss
from lowmem_sdpo.losses.kto import kto_loss
from lowmem_sdpo.losses.pairwise import LossOutput, dpop_loss, hinge_loss, ipo_loss, sigmoid_loss

CLI_TYPES: tuple[type, ...] = (float, int, str)


@dataclass(frozen=True)
class LossOption:
    default: Any
    type: type
    help: str
    choices: tuple[str, ...] | None = None
    # A check beyond type/choices, and the words the error uses for what was expected.
    valid: Callable[[Any], bool] | None = None
    expected: str = ""

    @property
    def is_flag(self) -> bool:
        return self.type in CLI_TYPES

    def check(self, loss: str, name: str, value: Any) -> Any:
        """The value converted to the option's type, or InputError naming the loss and option."""
        if self.type is torch.Tensor:
            if value is not None and not isinstance(value, torch.Tensor):
                raise InputError(
                    f"{loss} option {name}: expected a tensor or None, got {type(value).__name__}"
                )
            return value
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or isinstance(value, bool):
            raise InputError(f"{loss} option {name}: expected {self.type.__name__}, got {value!r}")
        if self.type is float and not math.isfinite(value):  # NaN passes every `v >= 0`-style check
            raise InputError(f"{loss} option {name}: expected a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise InputError(
                f"{loss} option {name}: expected one of {', '.join(self.choices)}, got {value!r}"
            )
        if self.valid is not None and not self.valid(value):
            raise InputError(f"{loss} option {name}: expected {self.expected}, got {value!r}")
        return value


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., LossOutput]
    formula: str  # one line, plain text
    paper: str
    paired_only: bool = True
    needs_tokens: bool = False  # per-sequence answer token counts (IPO averages per token)
    needs_kl: bool = False  # log-probs of mismatched prompt/completion pairs (KTO's reference point)
    batch_coupled: bool = False  # one example's loss depends on the others (AOT's sort)
    options: dict[str, LossOption] = field(default_factory=dict)


LABEL_SMOOTHING = LossOption(
    0.0,
    float,
    "fraction of preference labels assumed flipped (conservative DPO); 0 = off",
    valid=lambda v: 0.0 <= v < 0.5,
    expected="a number in [0, 0.5)",
)
AOT_OPTIONS: dict[str, LossOption] = {
    "aot_cost": LossOption("logistic", str, "AOT cost on sorted differences", choices=tuple(COSTS)),
    "aot_sort": LossOption(
        "hard", str, "hard = torch.sort; soft = NeuralSort relaxation", choices=tuple(SORTS)
    ),
    "aot_temperature": LossOption(
        0.1,
        float,
        "soft-sort temperature in nats of log-ratio (aot_sort=soft only)",
        valid=lambda v: v > 0,
        expected="a number > 0",
    ),
    "label_smoothing": LossOption(
        0.0,
        float,
        "label smoothing of the logistic AOT cost (as TRL); 0 = off",
        valid=lambda v: 0.0 <= v < 0.5,
        expected="a number in [0, 0.5)",
    ),
}
WEIGHT = {"valid": lambda v: v >= 0, "expected": "a number >= 0"}

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "sigmoid",
            sigmoid_loss,
            "-(1-ls) log sigmoid(beta h) - ls log sigmoid(-beta h), h = (pc-rc) - (pr-rr)",
            "Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290); "
            "ls: Mitchell 2023, conservative DPO",
            options={"label_smoothing": LABEL_SMOOTHING},
        ),
        LossSpec(
            "ipo",
            ipo_loss,
            "(h - 1/(2 beta))^2, h = (pc-rc)/chosen_tokens - (pr-rr)/rejected_tokens",
            "Azar et al. 2024, A General Theoretical Paradigm to Understand Learning from Human "
            "Preferences (arXiv 2310.12036)",
            needs_tokens=True,
        ),
        LossSpec(
            "hinge",
            hinge_loss,
            "max(0, 1 - beta h), h = (pc-rc) - (pr-rr)",
            "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv 2305.10425)",
        ),
        LossSpec(
            "dpop",
            dpop_loss,
            "-log sigmoid(beta (h - lambda max(0, rc - pc))), h = (pc-rc) - (pr-rr)",
            "Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive "
            "(arXiv 2402.13228)",
            options={
                "dpop_lambda": LossOption(
                    50.0, float, "weight of the chosen-below-reference penalty", **WEIGHT
                ),
            },
        ),
        LossSpec(
            "aot",
            aot_loss,
            "mean_k cost(sort(pc-pr)_k - sort(rc-rr)_k), cost logistic | hinge2 | lsq",
            "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport "
            "(arXiv 2406.05882)",
            batch_coupled=True,
            options=AOT_OPTIONS,
        ),
        LossSpec(
            "aot_unpaired",
            aot_unpaired_loss,
            "mean_k cost(sort(pc-rc)_k - sort(pr-rr)_k), cost logistic | hinge2 | lsq",
            "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport "
            "(arXiv 2406.05882)",
            paired_only=False,
            batch_coupled=True,
            options=AOT_OPTIONS,
        ),
        LossSpec(
            "kto",
            kto_loss,
            "desirable w_d (1 - sigmoid(beta (r - z0))), undesirable w_u (1 - sigmoid(beta (z0 - r))), "
            "r = policy - ref, z0 = max(0, mean KL estimate)",
            "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (arXiv 2402.01306)",
            paired_only=False,
            needs_kl=True,
            options={
                "policy_kl": LossOption(None, torch.Tensor, "policy log-probs of mismatched pairs [K]"),
                "ref_kl": LossOption(None, torch.Tensor, "reference log-probs of mismatched pairs [K]"),
                "desirable_weight": LossOption(1.0, float, "weight of desirable examples' losses", **WEIGHT),
                "undesirable_weight": LossOption(
                    1.0, float, "weight of undesirable examples' losses", **WEIGHT
                ),
            },
        ),
    )
}


def get_loss(name: str) -> LossSpec:
    spec = LOSSES.get(name)
    if spec is None:
        raise InputError(f"loss: unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return spec


def _check_logps(spec: LossSpec, tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{spec.name}: {key} must be a 1-D tensor of log-probs, got {shape}")
    for side in ("chosen", "rejected"):
        if tensors[f"policy_{side}"].shape != tensors[f"ref_{side}"].shape:
            raise InputError(
                f"{spec.name}: policy_{side} and ref_{side} must have the same length, got "
                f"{tensors[f'policy_{side}'].shape[0]} and {tensors[f'ref_{side}'].shape[0]}"
            )
    if spec.paired_only and tensors["policy_chosen"].shape != tensors["policy_rejected"].shape:
        raise InputError(
            f"{spec.name}: a paired loss needs as many chosen as rejected log-probs, got "
            f"{tensors['policy_chosen'].shape[0]} and {tensors['policy_rejected'].shape[0]}"
        )


def _check_tokens(spec: LossSpec, name: str, tokens: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if tokens is None:
        raise InputError(f"{spec.name}: needs {name} (answer token count per sequence) to average log-probs")
    tokens = torch.as_tensor(tokens, device=like.device)
    if tokens.shape != like.shape or bool((tokens <= 0).any()):
        raise InputError(
            f"{spec.name}: {name} must be positive counts of shape {tuple(like.shape)}, got shape "
            f"{tuple(tokens.shape)}"
        )
    return tokens


def preference_loss(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    **options: Any,
) -> LossOutput:
    """(losses, chosen_rewards, rejected_rewards) for the named loss; the objective is losses.mean().

    Inputs are summed answer log-probs [B] (KTO: desirable [Bd] as chosen, undesirable [Bu] as
    rejected). Options the loss does not list are an InputError; missing ones take the spec default.
    Token counts are used only by losses with needs_tokens (ignored otherwise).
    """
    spec = get_loss(name)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise InputError(f"{name}: beta must be a number > 0, got {beta!r}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise InputError(
            f"{name}: unknown option {', '.join(unknown)}; {name} takes: {', '.join(spec.options) or 'no options'}"
        )
    logps = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    _check_logps(spec, logps)
    kwargs = {key: opt.check(name, key, options.get(key, opt.default)) for key, opt in spec.options.items()}
    if spec.needs_tokens:
        kwargs["chosen_tokens"] = _check_tokens(spec, "chosen_tokens", chosen_tokens, policy_chosen)
        kwargs["rejected_tokens"] = _check_tokens(spec, "rejected_tokens", rejected_tokens, policy_rejected)
    return spec.fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=float(beta), **kwargs)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _flag_options() -> dict[str, LossOption]:
    """Each distinct CLI-able option across all losses (the first spec's wording wins)."""
    found: dict[str, LossOption] = {}
    for spec in LOSSES.values():
        for key, opt in spec.options.items():
            if opt.is_flag:
                found.setdefault(key, opt)
    return found


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """--loss plus one flag per distinct scalar option; flags default to None (= the loss's default)."""
    group = parser.add_argument_group("preference loss")
    group.add_argument("--loss", choices=list(LOSSES), default="sigmoid", help="objective (default sigmoid)")
    for key, opt in _flag_options().items():
        takers = [name for name, spec in LOSSES.items() if key in spec.options]
        group.add_argument(
            _flag(key),
            dest=key,
            type=opt.type,
            choices=list(opt.choices) if opt.choices else None,
            default=None,
            help=f"{opt.help} (losses: {', '.join(takers)}; default {opt.default})",
        )


def loss_options_from_args(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The scalar options `name` takes, from the parsed flags with spec defaults filled in.

    A flag given for an option the loss does not take is an InputError (silently ignoring it would
    let a typo'd experiment run with the wrong objective).
    """
    spec = get_loss(name)
    for key in _flag_options():
        if getattr(args, key, None) is not None and key not in spec.options:
            takes = ", ".join(_flag(k) for k, o in spec.options.items() if o.is_flag) or "no options"
            raise InputError(f"{_flag(key)}: loss {name!r} does not take it ({name} takes: {takes})")
    result: dict[str, Any] = {}
    for key, opt in spec.options.items():
        if not opt.is_flag:
            continue
        value = getattr(args, key, None)
        result[key] = opt.check(name, key, opt.default if value is None else value)
    return result
