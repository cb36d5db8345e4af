"""Public op: per-row log-probability of a target under log_softmax(z), z = the lm head's logits
softcap(scale * (hidden @ weight.T + bias)) (bias, scale and softcap optional; logit_transform.py).

This is the thin top tier. It validates inputs, drops ignored rows before any matmul (only rows
with a target cost work; index_select's backward scatters their gradient back), picks an
implementation from a registry and resolves the gradient-filtering threshold and head transform.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .configs import OpOptions, TritonConfig, resolve_filter_eps
from .logit_transform import check_bias, resolve_transform
from .naive import naive_linear_logprobs
from .torch_chunked import torch_linear_logprobs
from .triton_logprobs import triton_linear_logprobs

# core(hidden [M, D], weight [V, D], bias [V] or None, targets [M] all in [0, V), options) -> [M] float32
CoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, OpOptions], torch.Tensor]

IMPLS: dict[str, CoreFn] = {
    "triton": triton_linear_logprobs,  # fused kernels; CUDA, or CPU under TRITON_INTERPRET=1
    "torch": torch_linear_logprobs,  # chunked plain torch, bounded memory, any device
    "naive": naive_linear_logprobs,  # full [N, V] logits; tests and benchmarks only
}

# "auto" is resolved per call from where the data lives, never at import time.
AUTO_RULES: dict[bool, str] = {True: "triton", False: "torch"}  # key: hidden.is_cuda

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_impl(impl: str, hidden: torch.Tensor) -> str:
    """Map an impl name (incl. "auto") to a registry key; ValueError names the known ones."""
    name = AUTO_RULES[hidden.is_cuda] if impl == "auto" else impl
    if name not in IMPLS:
        known = ", ".join(["auto", *sorted(IMPLS)])
        raise ValueError(f"unknown impl {impl!r}; known: {known}")
    if name == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); use impl='torch'")
    return name


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected hidden [N, D], weight [V, D], targets [N]; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)} (need hidden [N, D], weight [V, D], targets [N])"
        )
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "auto",
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    filter_eps: float | str | None = "auto",
    triton_config: TritonConfig | str | None = None,
) -> torch.Tensor:
    """log_softmax(z)[n, targets[n]] for every row, z = softcap(logit_scale * (hidden @ weight.T + bias)),
    without N x V logits.

    Args:
        hidden: [N, D] fp16/bf16/fp32 (fp64 for torch/naive reference runs).
        weight: [V, D], same dtype. Its gradient is computed only if it requires grad.
        targets: [N] int64; rows equal to ignore_index give 0 and no gradient.
        impl: "auto" (triton on CUDA, torch otherwise), "triton", "torch" or "naive".
        bias: optional [V] lm-head bias (Phi), weight's dtype; its gradient only if it requires grad.
        logit_scale: multiplies the logits after the bias (Cohere's logit_scale; Granite's
            1 / logits_scaling). 1.0 = none.
        softcap: final softcap c, z = c * tanh(y / c) (Gemma 2/3's final_logit_softcapping);
            None = none. The defaults run exactly the code that existed before these keywords.
        filter_eps: per-row budget of softmax mass the backward may drop by skipping vocabulary
            tiles whose mass is negligible (see configs.AUTO_FILTER_EPS). "auto": dtype epsilon for
            bf16/fp16, off for fp32/fp64. None or 0 turns it off. The forward is always exact.
        triton_config: impl="triton" only. None = configs.DEFAULT_TRITON_CONFIG (no tuning
            stall); "autotune" = time configs.AUTOTUNE_TRITON_CONFIGS once per shape key (CUDA).
    Returns:
        [N] float32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias.
    """
    _check_inputs(hidden, weight, targets)
    check_bias(bias, weight)
    name = resolve_impl(impl, hidden)
    transform = resolve_transform(logit_scale, softcap)
    options = OpOptions(resolve_filter_eps(filter_eps, hidden.dtype), triton_config, transform)
    targets = targets.long()
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{row}] = {int(targets[row])} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == n_rows:  # nothing ignored: no compaction copy
        return IMPLS[name](hidden, weight, bias, targets, options).to(out_dtype)
    # Compaction: only valid rows reach the matmuls. index_select's backward scatters grad back.
    logp_valid = IMPLS[name](hidden.index_select(0, rows), weight, bias, targets.index_select(0, rows), options)
    out = torch.zeros(n_rows, dtype=out_dtype, device=hidden.device)
    return out.index_copy(0, rows, logp_valid.to(out_dtype))
