"""The registry of preference objectives: names, formulas, options and the CLI flags they make.

Adding a loss = one function (pairwise.py / aot.py / kto.py or a new module) + one `LossSpec` below.
Options with a scalar type (float / str) become CLI flags (`--label-smoothing` ...) through
`add_loss_arguments`; tensor options (KTO's KL log-probs) are passed by the engine.

Torch-free: each loss function is named by "module:function" and imported on first use, so the CLI builds
its parser and refuses a bad option before torch is imported. registry.preference_loss is the entry point
the engine calls.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowmem_sdpo.errors import InputError

# The names of aot.COSTS and aot.SORTS, literal here so that the registry needs no torch import
# (tests/unit/losses/test_losses_props.py checks they are the same).
AOT_COSTS = ("logistic", "hinge2", "lsq")
AOT_SORTS = ("hard", "soft")


class TensorInput:
    """The type of an option that is a tensor the engine passes (KTO's KL log-probs), never a flag."""

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
        if self.type is TensorInput:
            import torch

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
    impl: str  # "module:function" under lowmem_sdpo.losses, imported by `fn` on first use
    formula: str  # one line, plain text
    paper: str
    paired_only: bool = True
    needs_tokens: bool = False  # per-sequence answer token counts (IPO averages per token)
    needs_kl: bool = False  # log-probs of mismatched prompt/completion pairs (KTO's reference point)
    batch_coupled: bool = False  # one example's loss depends on the others (AOT's sort)
    options: dict[str, LossOption] = field(default_factory=dict)

    @property
    def fn(self) -> Callable[..., Any]:
        """The loss function: (pc, pr, rc, rr, beta=..., **options) -> LossOutput."""
        module, name = self.impl.split(":")
        return getattr(importlib.import_module(f"lowmem_sdpo.losses.{module}"), name)


LABEL_SMOOTHING = LossOption(
    0.0,
    float,
    "fraction of preference labels assumed flipped (conservative DPO); 0 = off",
    valid=lambda v: 0.0 <= v < 0.5,
    expected="a number in [0, 0.5)",
)
AOT_OPTIONS: dict[str, LossOption] = {
    "aot_cost": LossOption("logistic", str, "AOT cost on sorted differences", choices=AOT_COSTS),
    "aot_sort": LossOption(
        "hard", str, "hard = torch.sort; soft = NeuralSort relaxation", choices=AOT_SORTS
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
            "pairwise:sigmoid_loss",
            "-(1-ls) log sigmoid(beta h) - ls log sigmoid(-beta h), h = (pc-rc) - (pr-rr)",
            "Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290); "
            "ls: Mitchell 2023, conservative DPO",
            options={"label_smoothing": LABEL_SMOOTHING},
        ),
        LossSpec(
            "ipo",
            "pairwise:ipo_loss",
            "(h - 1/(2 beta))^2, h = (pc-rc)/chosen_tokens - (pr-rr)/rejected_tokens",
            "Azar et al. 2024, A General Theoretical Paradigm to Understand Learning from Human "
            "Preferences (arXiv 2310.12036)",
            needs_tokens=True,
        ),
        LossSpec(
            "hinge",
            "pairwise:hinge_loss",
            "max(0, 1 - beta h), h = (pc-rc) - (pr-rr)",
            "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv 2305.10425)",
        ),
        LossSpec(
            "dpop",
            "pairwise:dpop_loss",
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
            "aot:aot_loss",
            "mean_k cost(sort(pc-pr)_k - sort(rc-rr)_k), cost logistic | hinge2 | lsq",
            "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport "
            "(arXiv 2406.05882)",
            batch_coupled=True,
            options=AOT_OPTIONS,
        ),
        LossSpec(
            "aot_unpaired",
            "aot:aot_unpaired_loss",
            "mean_k cost(sort(pc-rc)_k - sort(pr-rr)_k), cost logistic | hinge2 | lsq",
            "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport "
            "(arXiv 2406.05882)",
            paired_only=False,
            batch_coupled=True,
            options=AOT_OPTIONS,
        ),
        LossSpec(
            "kto",
            "kto:kto_loss",
            "desirable w_d (1 - sigmoid(beta (r - z0))), undesirable w_u (1 - sigmoid(beta (z0 - r))), "
            "r = policy - ref, z0 = max(0, mean KL estimate)",
            "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (arXiv 2402.01306)",
            paired_only=False,
            needs_kl=True,
            options={
                "policy_kl": LossOption(None, TensorInput, "policy log-probs of mismatched pairs [K]"),
                "ref_kl": LossOption(None, TensorInput, "reference log-probs of mismatched pairs [K]"),
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
