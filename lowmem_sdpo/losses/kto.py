"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), as in TRL's `kto`.

Unpaired: "chosen" inputs are desirable examples [Bd], "rejected" inputs undesirable ones [Bu]; the
two counts may differ and either may be 0. With r = policy - ref per example and a reference point

    z0 = max(0, mean(policy_kl - ref_kl)).detach()

(policy_kl / ref_kl: log-probs of mismatched prompt/completion pairs [K], a batch estimate of
KL(policy || ref)), the losses are

    desirable:   w_d (1 - sigmoid(beta (r - z0)))
    undesirable: w_u (1 - sigmoid(beta (z0 - r)))

z0 is detached (as in the paper and TRL): it is a baseline, not something to optimise. Without KL
tensors z0 = 0 (TRL's behaviour when it does not compute the KL term); this is the cheaper variant
and is reasonable when the policy starts at the reference.
"""

from __future__ import annotations

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.losses.pairwise import LossOutput, rewards


def kl_reference_point(
    policy_kl: torch.Tensor | None, ref_kl: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """z0 = clamp(mean(policy_kl - ref_kl), min=0), detached; 0 when no KL tensors are given."""
    if policy_kl is None and ref_kl is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    if policy_kl is None or ref_kl is None:
        raise InputError("kto: give both policy_kl and ref_kl (log-probs of mismatched pairs), or neither")
    if policy_kl.dim() != 1 or policy_kl.shape != ref_kl.shape or policy_kl.numel() == 0:
        raise InputError(
            f"kto: policy_kl and ref_kl must be non-empty 1-D tensors of the same length, got shapes "
            f"{tuple(policy_kl.shape)} and {tuple(ref_kl.shape)}"
        )
    return (policy_kl - ref_kl).mean().clamp(min=0).detach().to(like.dtype)


def kto_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    policy_kl: torch.Tensor | None = None,
    ref_kl: torch.Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Returns (cat(desirable losses, undesirable losses) [Bd + Bu], rewards [Bd], rewards [Bu])."""
    z0 = kl_reference_point(policy_kl, ref_kl, policy_chosen)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * ((policy_chosen - ref_chosen) - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - (policy_rejected - ref_rejected))))
    losses = torch.cat([desirable, undesirable])
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))
