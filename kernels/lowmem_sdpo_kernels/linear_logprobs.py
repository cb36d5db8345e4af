"""Public op: per-row log-probability of a target under log_softmax(z), z = the lm head's logits
softcap(scale * (hidden @ weight.T + bias)) (bias, scale and softcap optional; logit_transform.py).

This is the thin top tier. It validates inputs, picks an implementation from a registry and
resolves the gradient-filtering threshold and head transform. Only rows with a target cost work:
the Triton kernels take the index of valid rows and read / write those rows in place (no copy of
hidden, no scatter of its gradient); the torch and naive impls compact them with index_select.

Host syncs: finding the valid rows (and checking their targets) on the device costs two
device -> host syncs per call (an .any() and a nonzero(), whose output size the host must know).
A caller that has the labels on the host computes them there once with valid_rows() before the
forward and passes rows=...; the call then launches everything without waiting for the device.

Determinism: the Triton backward adds tiles into dH / dW with atomics, whose order varies from run to
run (fp32 sums then differ in the last bits). deterministic=True runs the torch impl instead, whose
chunk loops add in a fixed order: bit-identical gradients run to run on one device and library build.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .configs import ELEMENT_SIZE, GRAD_ACCUM, OpOptions, TritonConfig, resolve_filter_eps
from .logit_transform import check_bias, resolve_transform
from .naive import naive_linear_logprobs
from .torch_chunked import torch_linear_logprobs
from .triton_logprobs import default_config, device_smem_limit, triton_linear_logprobs

# core(hidden [M, D], weight [V, D], bias [V] or None, targets [M] all in [0, V), options) -> [M] float32
CoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, OpOptions], torch.Tensor]

IMPLS: dict[str, CoreFn] = {
    "triton": triton_linear_logprobs,  # fused kernels; CUDA, or CPU under TRITON_INTERPRET=1
    "torch": torch_linear_logprobs,  # chunked plain torch, bounded memory, any device
    "naive": naive_linear_logprobs,  # full [N, V] logits; tests and benchmarks only
}

# Impls whose core takes the valid-row index itself (rows=); the others get compacted rows.
ROW_INDEXED = frozenset({"triton"})

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


def _checked_rows(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """[K] int64 indices of the rows with a target, after checking each lies in [0, vocab).
    On a CUDA tensor this is where the two host syncs happen; on a CPU tensor it costs none."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{row}] = {int(targets[row])} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )
    return valid.nonzero().squeeze(1)


def valid_rows(targets: torch.Tensor, vocab: int, ignore_index: int = -100) -> torch.Tensor:
    """The `rows` argument of linear_logprobs / sequence_logprobs, computed where `targets` lives.

    targets: any shape (flattened row-major, as sequence_logprobs flattens [B, T] labels), int.
    Returns [K] int64 indices of the entries != ignore_index, after checking they lie in [0, vocab)
    (ValueError naming the first bad one). Call it on the CPU labels before the forward and move the
    result to the device with the batch: then the op needs no device -> host sync.
    """
    return _checked_rows(targets.reshape(-1).long(), vocab, ignore_index)


def _check_rows(rows: torch.Tensor, n_rows: int, device: torch.device) -> None:
    # Metadata only (shape, dtype, device): looking at the values would be the sync rows= avoids.
    if rows.dim() != 1 or rows.dtype != torch.int64 or rows.device != device or rows.numel() > n_rows:
        raise ValueError(
            f"rows must be [K <= {n_rows}] int64 on {device} (valid_rows()); got {tuple(rows.shape)} "
            f"{rows.dtype} on {rows.device}"
        )


def _no_fit_message(hidden: torch.Tensor) -> str:
    limit = device_smem_limit(hidden.device)
    return (
        f"lowmem_sdpo_kernels: no Triton config for {hidden.dtype} fits {limit} B of shared memory per block "
        f"on {hidden.device}; using impl='torch' (chunked, slower)"
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
    rows: torch.Tensor | None = None,
    filter: str = "bound",
    grad_accum: str = "fp32",
    deterministic: bool = False,
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
        triton_config: impl="triton" only. None = the first of configs.TRITON_CONFIGS_BY_DTYPE
            that fits the device's shared memory (no tuning stall; if none fits, impl="torch" with
            one warning); "autotune" = time configs.AUTOTUNE_TRITON_CONFIGS once per shape key (CUDA).
        rows: optional [K] int64 indices (on hidden's device) of exactly the rows whose target is not
            ignore_index, all of those targets in [0, V): what valid_rows() returns. The caller
            vouches for it (it is not looked at on the device); in exchange the call makes no
            device -> host sync. None: found and checked here (two syncs on CUDA).
        filter: "bound" (filter_eps is a per-row budget of dropped softmax mass: a rigorous bound) or
            "element" (CCE's rule: a tile is skipped when every p < filter_eps; "auto" = 2**-12 for
            bf16/fp16). Error bounds of both in configs.py.
        grad_accum: impl="triton" only: "fp32" atomics into fp32 gradient buffers (default) or
            "input" (atomics in the input dtype, CCE's bf16 option: half the traffic, less exact).
        deterministic: run the ordered torch impl where the Triton one would run (see above).
    Returns:
        [N] float32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias.
    """
    _check_inputs(hidden, weight, targets)
    check_bias(bias, weight)
    name = resolve_impl(impl, hidden)
    if deterministic and name == "triton":
        name = "torch"
    if grad_accum not in GRAD_ACCUM:
        raise ValueError(f"grad_accum must be one of {sorted(GRAD_ACCUM)}, got {grad_accum!r}")
    if name == "triton" and hidden.dtype in ELEMENT_SIZE and not isinstance(triton_config, TritonConfig):
        # The tile is picked here, so that a card too small for every config falls back to the
        # chunked torch impl (one warning) instead of failing at the first launch.
        fitting = default_config(hidden.dtype, hidden.device)
        if fitting is None:
            warnings.warn(_no_fit_message(hidden), RuntimeWarning, stacklevel=2)
            name = "torch"
        elif triton_config is None:
            triton_config = fitting
    transform = resolve_transform(logit_scale, softcap)
    options = OpOptions(
        resolve_filter_eps(filter_eps, hidden.dtype, filter), triton_config, transform,
        filter_mode=filter, grad_accum=grad_accum,
    )
    targets = targets.long()
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if rows is None:
        rows = _checked_rows(targets, vocab, ignore_index)
    else:
        _check_rows(rows, n_rows, hidden.device)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if name in ROW_INDEXED:  # nothing ignored (a size check, no sync): no index to read
        return triton_linear_logprobs(hidden, weight, bias, targets, options, None if rows.numel() == n_rows else rows)
    if rows.numel() == n_rows:  # nothing ignored: no compaction copy
        return IMPLS[name](hidden, weight, bias, targets, options).to(out_dtype)
    # Compaction: only valid rows reach the matmuls. index_select's backward scatters grad back.
    logp_valid = IMPLS[name](hidden.index_select(0, rows), weight, bias, targets.index_select(0, rows), options)
    out = torch.zeros(n_rows, dtype=out_dtype, device=hidden.device)
    return out.index_copy(0, rows, logp_valid.to(out_dtype))
