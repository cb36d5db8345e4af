"""Public op: per-sequence sum of target log-probs and token counts (the DPO policy/reference term)."""

from __future__ import annotations

import torch

from .configs import TritonConfig
from .linear_logprobs import linear_logprobs


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "auto",
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    filter_eps: float | str | None = "auto",
    triton_config: TritonConfig | str | None = None,
    rows: torch.Tensor | None = None,
    filter: str = "bound",
    grad_accum: str = "fp32",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over t of log p(labels[b, t] | hidden[b, t]) and the number of labelled positions.

    Args:
        hidden: [B, T, D] final hidden states (before the lm head).
        weight: [V, D] lm-head weight; bias [V], logit_scale and softcap as in linear_logprobs.
        labels: [B, T], already aligned with hidden (the caller shifts); ignore_index = no target.
        impl, filter_eps, triton_config, filter, grad_accum, deterministic: as in linear_logprobs.
        rows: optional valid_rows(labels, V) (indices into the flattened [B * T] labels), moved to
            hidden's device: no device -> host sync. None: found on the device (as linear_logprobs).
    Returns:
        (logp_sum [B] float32, n_tokens [B] int64). A sequence with no labelled position gives
        (0.0, 0); its hidden rows get zero gradient.
    """
    if hidden.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"expected hidden [B, T, D] and labels [B, T]; got hidden {tuple(hidden.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    batch, length, dim = hidden.shape
    logp = linear_logprobs(
        hidden.reshape(batch * length, dim),
        weight,
        labels.reshape(batch * length),
        ignore_index=ignore_index,
        impl=impl,
        bias=bias,
        logit_scale=logit_scale,
        softcap=softcap,
        filter_eps=filter_eps,
        triton_config=triton_config,
        rows=rows,
        filter=filter,
        grad_accum=grad_accum,
        deterministic=deterministic,
    )
    logp_sum = logp.view(batch, length).sum(dim=1)
    n_tokens = (labels != ignore_index).sum(dim=1, dtype=torch.int64)
    return logp_sum, n_tokens
