"""Fused Triton implementation (CCE-style): lm-head matmul, log-softmax and target pick in one pass.

Tier 1: @triton.jit kernels. Tier 2: TritonLinearLogprobs (autograd.Function). Tier 3:
triton_linear_logprobs, the core the public linear_logprobs dispatches to.

Forward: program (row block i, vocabulary split s) walks its run of BLOCK_V-wide vocabulary tiles,
computing each [BLOCK_M, BLOCK_V] logits tile in registers (fp32 accumulation over D in BLOCK_D
steps) and folding it into a running (max, sum of exp) and the target logit. Per row and split it
stores 3 floats; the host merges the n_splits partials (n_splits <= MAX_VOCAB_SPLITS) into the
log-sum-exp. Global memory: 3 * n_splits * M * 4 bytes, O(M). No logits leave registers.

Head transform (logit_transform.py): the fp32 tile x = H W^T gets + bias, * scale and the softcap
c * tanh(y / c) in registers, each only when present (constexpr flags: the identity head compiles
to exactly the kernel that existed before). _head_logits is shared by forward and backward.

Backward: program (row block i, vocabulary tile j) recomputes its logits tile with the same
helpers and tile shape as the forward (same reduction order over D: identical values), forms
dz = g * (onehot(target) - softmax) * (1 - tanh^2) * scale in registers, and adds dz @ W_tile into
an fp32 [M, D] gradient buffer, dz^T @ H_block into an fp32 [V, D] buffer and the column sums of
dz into an fp32 [V] bias-gradient buffer with atomics (the latter two only when the weight / bias
requires grad). These buffers are the gradients themselves at fp32; they are cast to the input
dtype once at the end. A tile whose softmax mass is below filter_eps / n_tiles for
every row, and that holds no row's target, skips both products (gradient filtering).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .configs import (
    AUTOTUNE_TRITON_CONFIGS,
    MAX_VOCAB_SPLITS,
    OpOptions,
    TritonConfig,
    select_triton_config,
    shared_memory_bytes,
)
from .logit_transform import LogitTransform

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _logits_tile(
    H, W, offs_m, offs_v, mask_m, mask_v, D,
    stride_hm, stride_hd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_V] fp32 logits H[offs_m] @ W[offs_v]^T. Shared by forward and backward."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        h = tl.load(
            H + offs_m[:, None] * stride_hm + dd[None, :] * stride_hd,
            mask=mask_m[:, None] & mask_d[None, :], other=0.0,
        )
        w_t = tl.load(  # [BLOCK_D, BLOCK_V]: W tile loaded transposed
            W + offs_v[None, :] * stride_wv + dd[:, None] * stride_wd,
            mask=mask_v[None, :] & mask_d[:, None], other=0.0,
        )
        acc = tl.dot(h, w_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tanh(x):
    """fp32 tanh from exp (tl has none, and libdevice's does not run in the interpreter). For
    |x| >= 1/8: (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1], which cannot overflow and loses
    at most a few ulp (1 - e >= 0.22 there). Below 1/8 that difference would cancel, so the odd
    Taylor series to x^7 is used; its first omitted term, 62/2835 x^9, is < 1.3e-9 |x| there, under
    fp32's 6e-8 relative rounding."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _head_logits(
    acc, B, offs_v, mask_v, scale, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """x = acc (+ bias) -> y = scale * x -> z = c * tanh(y / c); returns (z, tanh(y / c)) (the
    second is z itself without a softcap, unused then). Shared by forward and backward."""
    if HAS_BIAS:
        acc += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc = acc * scale
    t = acc
    if HAS_SOFTCAP:
        t = _tanh(acc * inv_softcap)
        acc = t * softcap
    return acc, t


@triton.jit
def _forward_kernel(
    H, W, B, T, PART_MAX, PART_SUM, PART_TGT,
    M, V, D, tiles_per_split, scale, softcap, inv_softcap,
    stride_hm, stride_hd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    tgt = tl.load(T + offs_m, mask=mask_m, other=-1)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    tgt_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, tiles_per_split):
        # The host picks n_splits so every split's first tile starts below V: run_max is finite
        # after it, and later all-padding tiles contribute exp(-inf) = 0 without NaNs.
        offs_v = ((pid_s * tiles_per_split + i) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < V
        z = _logits_tile(
            H, W, offs_m, offs_v, mask_m, mask_v, D, stride_hm, stride_hd, stride_wv, stride_wd,
            BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        z, _ = _head_logits(z, B, offs_v, mask_v, scale, softcap, inv_softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s * M + offs_m
    tl.store(PART_MAX + out, run_max, mask=mask_m)
    tl.store(PART_SUM + out, run_sum, mask=mask_m)
    tl.store(PART_TGT + out, tgt_logit, mask=mask_m)


@triton.jit
def _backward_kernel(
    H, W, B, T, LSE, G, DH, DW, DB,
    M, V, D, tile_budget, scale, softcap, inv_softcap,
    stride_hm, stride_hd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_m = offs_m < M
    mask_v = offs_v < V
    z = _logits_tile(
        H, W, offs_m, offs_v, mask_m, mask_v, D, stride_hm, stride_hd, stride_wv, stride_wd,
        BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )
    z, t = _head_logits(z, B, offs_v, mask_v, scale, softcap, inv_softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    g = tl.load(G + offs_m, mask=mask_m, other=0.0)  # padded rows: g = 0 -> dz = 0
    tgt = tl.load(T + offs_m, mask=mask_m, other=-1)
    p = tl.where(mask_m[:, None] & mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    is_tgt = offs_v[None, :] == tgt[:, None]
    keep = True
    if FILTER:
        tile_mass = tl.max(tl.sum(p, axis=1), axis=0)
        n_targets = tl.sum(tl.sum(is_tgt.to(tl.int32), axis=1), axis=0)
        keep = (tile_mass >= tile_budget) | (n_targets > 0)
    if keep:
        dz = g[:, None] * (tl.where(is_tgt, 1.0, 0.0) - p)  # d / d z (padded rows and columns: 0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)  # d z / d y, from the very tanh the logits were built from
        if HAS_SCALE:
            dz = dz * scale  # d y / d x
        if COMPUTE_DB:
            tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
        dz = dz.to(H.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            if COMPUTE_DH:
                w = tl.load(
                    W + offs_v[:, None] * stride_wv + dd[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0,
                )
                dh = tl.dot(dz, w, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D] fp32
                tl.atomic_add(
                    DH + offs_m[:, None] * D + dd[None, :], dh, mask=mask_m[:, None] & mask_d[None, :], sem="relaxed"
                )
            if COMPUTE_DW:
                h = tl.load(
                    H + offs_m[:, None] * stride_hm + dd[None, :] * stride_hd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0,
                )
                dw = tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_D] fp32
                tl.atomic_add(
                    DW + offs_v[:, None] * D + dd[None, :], dw, mask=mask_v[:, None] & mask_d[None, :], sem="relaxed"
                )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (no silent TF32); fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _vocab_splits(vocab: int, block_v: int) -> tuple[int, int]:
    n_tiles = triton.cdiv(vocab, block_v)
    tiles_per_split = triton.cdiv(n_tiles, min(MAX_VOCAB_SPLITS, n_tiles))
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def _head_args(transform: LogitTransform, bias: torch.Tensor | None) -> dict:
    """Kernel arguments of the head transform. Absent parts become constexpr False (their code is
    compiled out) and placeholder numbers that are never read."""
    cap = transform.softcap
    return {
        "scale": transform.scale,
        "softcap": 1.0 if cap is None else cap,
        "inv_softcap": 1.0 if cap is None else 1.0 / cap,
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": transform.has_scale,
        "HAS_SOFTCAP": transform.has_softcap,
    }


def _launch_forward(
    hidden, weight, bias, targets, transform: LogitTransform, cfg: TritonConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logp [M] fp32, lse [M] fp32)."""
    m_rows, dim = hidden.shape
    vocab = weight.shape[0]
    if m_rows == 0:  # every row ignored: an empty grid is not launchable
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty
    n_splits, tiles_per_split = _vocab_splits(vocab, cfg.block_v)
    parts = torch.empty((3, n_splits, m_rows), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(m_rows, cfg.block_m), n_splits)
    _forward_kernel[grid](
        hidden, weight, bias if bias is not None else parts, targets, parts[0], parts[1], parts[2],
        m_rows, vocab, dim, tiles_per_split,
        stride_hm=hidden.stride(0), stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_head_args(transform, bias),
    )
    part_max, part_sum, part_tgt = parts[0], parts[1], parts[2]
    gmax = part_max.amax(dim=0)
    lse = gmax + torch.log((part_sum * torch.exp(part_max - gmax)).sum(dim=0))
    return part_tgt.sum(dim=0) - lse, lse


def _launch_backward(
    hidden, weight, bias, targets, lse, grad_out, cfg: TritonConfig,
    needs: tuple[bool, bool, bool], options: OpOptions,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """needs = (hidden, weight, bias) gradients wanted -> those gradients (None where not)."""
    need_hidden, need_weight, need_bias = needs
    filter_eps = options.filter_eps
    m_rows, dim = hidden.shape
    vocab = weight.shape[0]
    n_tiles = triton.cdiv(vocab, cfg.block_v)
    # fp32 accumulators (atomics from every vocabulary tile / row block land here).
    dh = torch.zeros((m_rows, dim), dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw = torch.zeros((vocab, dim), dtype=torch.float32, device=weight.device) if need_weight else None
    db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None

    def cast(acc: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        return acc.to(like.dtype) if acc is not None and like is not None else None

    if m_rows == 0:
        return cast(dh, hidden), cast(dw, weight), cast(db, bias)
    dummy = torch.empty(1, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(m_rows, cfg.block_m), n_tiles)
    _backward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, targets, lse, grad_out.float().contiguous(),
        dh if dh is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
        m_rows, vocab, dim, 0.0 if filter_eps is None else filter_eps / n_tiles,
        stride_hm=hidden.stride(0), stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        DOT_PRECISION=_dot_precision(hidden.dtype),
        COMPUTE_DH=need_hidden, COMPUTE_DW=need_weight, COMPUTE_DB=need_bias, FILTER=filter_eps is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_head_args(options.transform, bias),
    )
    return cast(dh, hidden), cast(dw, weight), cast(db, bias)


class TritonLinearLogprobs(torch.autograd.Function):
    """Saves the inputs and lse [M]; the backward kernel recomputes logits tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options, cfg):  # type: ignore[override]
        logp, lse = _launch_forward(hidden, weight, bias, targets, options.transform, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options, ctx.cfg = options, cfg
        return logp

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        # A frozen weight (or bias) compiles COMPUTE_DW (COMPUTE_DB) out: no dW (db) work at all.
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_h, grad_w, grad_b = _launch_backward(
            hidden, weight, bias, targets, lse, grad_out, ctx.cfg, needs, ctx.options
        )
        return grad_h, grad_w, grad_b, None, None, None


@functools.cache
def _cuda_smem_limit(index: int) -> int | None:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", None)  # bytes per block, opt-in maximum


def device_smem_limit(device: torch.device) -> int | None:
    """Shared memory per block the device allows (opt-in maximum); None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_smem_limit(device.index if device.index is not None else torch.cuda.current_device())


def default_config(dtype: torch.dtype, device: torch.device) -> TritonConfig | None:
    """configs.select_triton_config for this device: None when no config fits its shared memory."""
    return select_triton_config(dtype, device_smem_limit(device))


_AUTOTUNE_CACHE: dict[tuple, TritonConfig] = {}


def autotune_config(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, options: OpOptions
) -> TritonConfig:
    """Time forward+backward for each of AUTOTUNE_TRITON_CONFIGS (CUDA only) and keep the fastest
    per (power-of-two M bucket, V, D, dtype, weight-grad) key. Off unless asked for."""
    need_w = weight.requires_grad
    key = (triton.next_power_of_2(hidden.shape[0]), weight.shape[0], hidden.shape[1], hidden.dtype, need_w)
    if key in _AUTOTUNE_CACHE:
        return _AUTOTUNE_CACHE[key]
    fallback = default_config(hidden.dtype, hidden.device)
    if not hidden.is_cuda or fallback is None:
        return fallback
    from triton.testing import do_bench  # only the tuner needs it
    limit = device_smem_limit(hidden.device)
    grad = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    needs = (True, need_w, bias is not None and bias.requires_grad)
    timings: dict[TritonConfig, float] = {}
    with torch.no_grad():
        for cfg in AUTOTUNE_TRITON_CONFIGS:
            if limit is not None and shared_memory_bytes(cfg, hidden.dtype) > limit:
                continue  # would not fit: not worth a compile
            def run(cfg: TritonConfig = cfg) -> None:
                _, lse = _launch_forward(hidden, weight, bias, targets, options.transform, cfg)
                _launch_backward(hidden, weight, bias, targets, lse, grad, cfg, needs, options)
            try:
                timings[cfg] = do_bench(run, warmup=5, rep=20)
            except OutOfResources:  # the bound was too optimistic for this compiler: skip the config.
                continue  # Anything else (a CUDA fault, a bug) must surface, not be timed away.
    best = min(timings, key=timings.__getitem__) if timings else fallback
    _AUTOTUNE_CACHE[key] = best
    return best


def triton_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: OpOptions,
) -> torch.Tensor:
    """hidden [M, D], weight [V, D], bias [V] or None, targets [M] all valid -> [M] fp32 log-probs."""
    if hidden.dtype not in _TL_DTYPES:
        raise ValueError(f"impl='triton' supports float16, bfloat16 and float32, got {hidden.dtype}")
    cfg = options.triton_config
    if cfg == "autotune":
        cfg = autotune_config(hidden, weight, bias, targets, options)
    elif cfg is None:
        cfg = default_config(hidden.dtype, hidden.device)
    elif not isinstance(cfg, TritonConfig):
        raise ValueError(f"triton_config must be a TritonConfig, 'autotune' or None, got {cfg!r}")
    if cfg is None:  # linear_logprobs falls back to impl="torch" before getting here
        raise ValueError(
            f"no Triton config fits {device_smem_limit(hidden.device)} B of shared memory for {hidden.dtype}"
        )
    if bias is not None:
        bias = bias.contiguous()  # the kernels index it as one stride-1 row
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets.contiguous(), options, cfg)
