"""The one entry point the engine calls: `preference_loss(name, pc, pr, rc, rr, beta=..., **options)`, with
the checks of its tensors. The registry itself (LOSSES, options, flags) is specs.py, torch-free."""

from __future__ import annotations

from typing import Any

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.losses.pairwise import LossOutput
from lowmem_sdpo.losses.specs import LossSpec, get_loss


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


