"""Per-pair preference losses: each example's loss depends only on its own four log-probs.

Inputs are summed sequence log-probs [B]: policy_chosen (pc), policy_rejected (pr), ref_chosen (rc),
ref_rejected (rr). h = (pc - rc) - (pr - rr) is the DPO margin. Rewards returned by every loss are
beta * (policy - ref) of the summed log-probs, detached: they are metrics, and using the same
definition for every loss keeps reward accuracy / margins comparable across losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards beta * (policy - ref), detached (for logging, never for the gradient)."""
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = (pc - rc) - (pr - rr)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - ls) log sigmoid(z) - ls log sigmoid(-z): the logistic loss when a fraction ls of labels is flipped."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023); label_smoothing > 0 gives conservative DPO (Mitchell 2023, cDPO).

    loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
    """
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = smoothed_logistic(beta * h, label_smoothing)
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> LossOutput:
    """IPO (Azar et al. 2024), on per-token averaged log-ratios as in TRL.

    h = (pc - rc) / chosen_tokens - (pr - rr) / rejected_tokens;  loss = (h - 1 / (2 beta))^2
    Averaging per token keeps h on the scale of 1 / (2 beta) whatever the answer lengths.
    """
    dtype = policy_chosen.dtype
    h = (policy_chosen - ref_chosen) / chosen_tokens.to(dtype) - (policy_rejected - ref_rejected) / (
        rejected_tokens.to(dtype)
    )
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SLiC-HF hinge (Zhao et al. 2023) on the DPO margin, as TRL's `hinge`: loss = relu(1 - beta h)."""
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * h)
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def dpop_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    dpop_lambda: float = 50.0,
) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, Smaug): penalise the chosen log-prob falling below the reference.

    loss = -log sigmoid(beta (h - lambda max(0, rc - pc)))
    Plain DPO can lower both answers' likelihood as long as the margin grows; the penalty stops the
    chosen answer dropping below where the reference put it.
    """
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    penalty = torch.clamp(ref_chosen - policy_chosen, min=0)
    losses = -F.logsigmoid(beta * (h - dpop_lambda * penalty))
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))
