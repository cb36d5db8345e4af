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
an [N, D] gradient buffer, dz^T @ H_block into a [V, D] buffer (fp32 by default, the input dtype
with grad_accum="input") and the column sums of dz into an fp32 [V] bias-gradient buffer with
atomics; each product only when its input requires grad (constexpr: a frozen lm head compiles the
dW product out and allocates no dW buffer). The buffers are cast to the input dtype once at the end.
Filters (configs.py for the error bounds) skip the dH and the dW product of a target-free tile
separately: FILTER 1 when every row's (dH: or its whole forward split's) / column's (dW) softmax
mass in the tile is under its share of filter_eps, FILTER 2 when every softmax entry is under
filter_eps (CCE's rule).

Launch order (issue 13): both grids are 1-D and numbered by _grouped_tile, so GROUP_M row blocks
walk the vocabulary together and a wave of resident programs shares their hidden / dH rows and a
few weight tiles in L2 (benchmarks/README.md, "HBM traffic", has the arithmetic).

Ignored rows: with a valid-row index ROWS (HAS_ROWS), program row k is physical row ROWS[k] of
hidden, targets, grad and dH; partials and lse are per logical row. Nothing is compacted or
scattered, and offsets are int64 (row * stride never wraps).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .configs import (
    AUTOTUNE_TRITON_CONFIGS,
    FILTER_MODES,
    GRAD_ACCUM,
    MAX_VOCAB_SPLITS,
    TRITON_CONFIGS_BY_DTYPE,
    OpOptions,
    TritonConfig,
    fitting_configs,
    select_triton_config,
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
def _grouped_tile(pid, n_m, n_v, GROUP_M: tl.constexpr):
    """Program id -> (row block, vocabulary tile or split) in grouped order: GROUP_M row blocks walk
    the vocabulary together, the row block varying fastest inside a group. A wave of resident
    programs then covers GROUP_M row blocks (their hidden rows and dH rows: GROUP_M * BLOCK_M * D *
    (2 + 4) B, 6 MiB at 8 x 128 x 4096 bf16) and a few vocabulary tiles, both L2-sized, instead of
    every row block at once (the HBM arithmetic is in benchmarks/README.md). Mirrored on the host by
    grouped_order() for the tests."""
    per_group = GROUP_M * n_v
    group = pid // per_group
    first_m = group * GROUP_M
    size = tl.minimum(n_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % size, local // size


@triton.jit
def _row_ids(ROWS, offs, mask, HAS_ROWS: tl.constexpr):
    """Logical rows (0..K) -> physical rows of hidden / targets / grad: ROWS[offs] when a valid-row
    index is given (ignored rows never reach a program, and nothing is compacted), else offs."""
    if HAS_ROWS:
        return tl.load(ROWS + offs, mask=mask, other=0).to(tl.int64)
    return offs


@triton.jit
def _forward_kernel(
    H, W, B, T, ROWS, PART_MAX, PART_SUM, PART_TGT,
    M, V, D, n_splits, tiles_per_split, scale, softcap, inv_softcap,
    stride_hm, stride_hd, stride_wv, stride_wd, stride_t,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    pid_m, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), n_splits, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = _row_ids(ROWS, offs_m, mask_m, HAS_ROWS)
    tgt = tl.load(T + rows * stride_t, mask=mask_m, other=-1)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    tgt_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, tiles_per_split):
        # The host picks n_splits so every split's first tile starts below V: run_max is finite
        # after it, and later all-padding tiles contribute exp(-inf) = 0 without NaNs.
        offs_v = (pid_s * tiles_per_split + i).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(
            H, W, rows, offs_v, mask_m, mask_v, D, stride_hm, stride_hd, stride_wv, stride_wd,
            BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )
        z, _ = _head_logits(z, B, offs_v, mask_v, scale, softcap, inv_softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s * M + offs_m  # partials are indexed by logical row
    tl.store(PART_MAX + out, run_max, mask=mask_m)
    tl.store(PART_SUM + out, run_sum, mask=mask_m)
    tl.store(PART_TGT + out, tgt_logit, mask=mask_m)


@triton.jit
def _backward_kernel(
    H, W, B, T, ROWS, LSE, G, DH, DW, DB, SPLIT_MASS,
    M, V, D, tiles_per_split, thr_dh, thr_split, thr_dw, scale, softcap, inv_softcap,
    stride_hm, stride_hd, stride_wv, stride_wd, stride_t, stride_g,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_V] tile: recompute z, form dz, add dz @ W_tile into DH and dz^T @ H_block
    into DW (atomics, in DH's / DW's dtype: fp32 by default). FILTER: 0 none; 1 the mass bound (dH
    product skipped when every row's tile mass < thr_dh or its whole forward split's mass
    SPLIT_MASS[split, row] <= thr_split; dW product when every column's mass < thr_dw); 2 the
    per-element rule (both skipped when every p < thr_dh). Tiles holding a target are always kept.
    The two products are tested separately: each has its own error budget (configs.py)."""
    n_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_v = _grouped_tile(tl.program_id(0), n_m, tl.cdiv(V, BLOCK_V), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    rows = _row_ids(ROWS, offs_m, mask_m, HAS_ROWS)
    z = _logits_tile(
        H, W, rows, offs_v, mask_m, mask_v, D, stride_hm, stride_hd, stride_wv, stride_wd,
        BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )
    z, t = _head_logits(z, B, offs_v, mask_v, scale, softcap, inv_softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)  # LSE is per logical row
    g = tl.load(G + rows * stride_g, mask=mask_m, other=0.0).to(tl.float32)  # padded rows: g = 0 -> dz = 0
    tgt = tl.load(T + rows * stride_t, mask=mask_m, other=-1)
    p = tl.where(mask_m[:, None] & mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    keep_dh = True
    keep_dw = True
    if FILTER != 0:
        # Whether a row's target lies in this tile, from the [BLOCK_M] targets alone: a 2-D one-hot
        # kept alive across the filter's reductions costs registers (and spills, on sm90 at 128 x 128).
        v_lo = pid_v.to(tl.int64) * BLOCK_V
        has_target = tl.sum(((tgt >= v_lo) & (tgt < v_lo + BLOCK_V)).to(tl.int32), axis=0) > 0
        if FILTER == 1:
            # A row needs this tile's dH product unless its mass here is under its per-tile share, or
            # the mass of the whole vocabulary split holding the tile (from the forward) is under its
            # per-split share: then every tile of that split may go for the row.
            split_mass = tl.load(SPLIT_MASS + (pid_v // tiles_per_split) * M + offs_m, mask=mask_m, other=0.0)
            row_needs = (tl.sum(p, axis=1) >= thr_dh) & (split_mass > thr_split)
            keep_dh = has_target | (tl.max(row_needs.to(tl.int32), axis=0) > 0)
            if COMPUTE_DW:
                keep_dw = has_target | (tl.max(tl.sum(p, axis=0), axis=0) >= thr_dw)
        else:
            keep_dh = has_target | (tl.max(tl.max(p, axis=1), axis=0) >= thr_dh)
            keep_dw = keep_dh
    if keep_dh | keep_dw | COMPUTE_DB:
        # d / d z = g * (onehot(target) - p); padded rows (g = 0) and columns (p = 0) give 0
        dz = tl.where(offs_v[None, :] == tgt[:, None], 1.0 - p, -p) * g[:, None]
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)  # d z / d y, from the very tanh the logits were built from
        if HAS_SCALE:
            dz = dz * scale  # d y / d x
        if COMPUTE_DB:  # the bias gradient is one column sum: never filtered
            tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
        dz = dz.to(H.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            if COMPUTE_DH:  # constexpr: a frozen hidden compiles this out
                if keep_dh:
                    w = tl.load(
                        W + offs_v[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=mask_v[:, None] & mask_d[None, :], other=0.0,
                    )
                    dh = tl.dot(dz, w, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D] fp32
                    tl.atomic_add(
                        DH + rows[:, None] * D + dd[None, :], dh.to(DH.dtype.element_ty),
                        mask=mask_m[:, None] & mask_d[None, :], sem="relaxed",
                    )
            if COMPUTE_DW:  # constexpr: a frozen weight (the sDPO lm head) compiles this out
                if keep_dw:
                    h = tl.load(
                        H + rows[:, None] * stride_hm + dd[None, :] * stride_hd,
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
                    )
                    dw = tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_D] fp32
                    tl.atomic_add(
                        DW + offs_v[:, None] * D + dd[None, :], dw.to(DW.dtype.element_ty),
                        mask=mask_v[:, None] & mask_d[None, :], sem="relaxed",
                    )


def grouped_order(pid: int, n_m: int, n_v: int, group_m: int) -> tuple[int, int]:
    """Host mirror of _grouped_tile (tests check it is a bijection and that the kernels use it)."""
    per_group = group_m * n_v
    first_m = (pid // per_group) * group_m
    size = min(n_m - first_m, group_m)
    local = pid % per_group
    return first_m + local % size, local // size


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


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch, built but not yet run: what the launchers run, what the autotuner's shared-memory
    check compiles (warmup: the JIT's own specialisation of these very arguments, nothing launched), and what
    benchmarks/kernel_resources.py compiles for another GPU on a CPU."""

    kernel: triton.runtime.jit.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)

    def compile(self):  # -> triton.compiler.CompiledKernel (CUDA only: the current device's target)
        return self.kernel.warmup(*self.args, grid=self.grid, **self.kwargs)


def forward_launch(
    hidden, weight, bias, targets, rows, transform: LogitTransform, cfg: TritonConfig
) -> tuple[KernelLaunch, torch.Tensor]:
    """-> (the forward's launch, its partials [3, n_splits, K] fp32, allocated on hidden's device). K > 0."""
    m_rows = hidden.shape[0] if rows is None else rows.shape[0]
    vocab = weight.shape[0]
    n_splits, tiles_per_split = _vocab_splits(vocab, cfg.block_v)
    parts = torch.empty((3, n_splits, m_rows), dtype=torch.float32, device=hidden.device)
    launch = KernelLaunch(
        _forward_kernel,
        (triton.cdiv(m_rows, cfg.block_m) * n_splits,),
        (
            hidden, weight, bias if bias is not None else parts, targets, rows if rows is not None else targets,
            parts[0], parts[1], parts[2],
            m_rows, vocab, hidden.shape[1], n_splits, tiles_per_split,
        ),
        dict(
            stride_hm=hidden.stride(0), stride_hd=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1), stride_t=targets.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_M=cfg.group_m,
            DOT_PRECISION=_dot_precision(hidden.dtype), HAS_ROWS=rows is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **_head_args(transform, bias),
        ),
    )
    return launch, parts


def _launch_forward(
    hidden, weight, bias, targets, rows, transform: LogitTransform, cfg: TritonConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [K] fp32, lse [K] fp32, split_mass [n_splits, K] fp32) over the K logical rows (rows[k],
    or k when rows is None). split_mass: each row's softmax mass in each vocabulary split, from the
    partials (sum of exp(z - max) * exp(max - lse)), for the backward's mass-bound filter."""
    m_rows = hidden.shape[0] if rows is None else rows.shape[0]
    if m_rows == 0:  # every row ignored: an empty grid is not launchable
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty, empty.view(0, 0)
    launch, parts = forward_launch(hidden, weight, bias, targets, rows, transform, cfg)
    launch.run()
    part_max, part_sum, part_tgt = parts[0], parts[1], parts[2]
    gmax = part_max.amax(dim=0)
    lse = gmax + torch.log((part_sum * torch.exp(part_max - gmax)).sum(dim=0))
    return part_tgt.sum(dim=0) - lse, lse, part_sum * torch.exp(part_max - lse)


def _filter_args(options: OpOptions, n_row_blocks: int, n_tiles: int, n_splits: int) -> dict:
    """FILTER code and the thresholds the backward compares tile statistics with (configs.py).
    bound: a row may drop half of filter_eps in tiles under eps / (2 n_tiles) each and half in whole
    splits under eps / (2 n_splits) each (dH); a vocabulary entry filter_eps over its n_row_blocks
    row blocks (dW). element: every p below filter_eps."""
    eps = options.filter_eps
    if eps is None:
        return {"FILTER": 0, "thr_dh": 0.0, "thr_split": 0.0, "thr_dw": 0.0}
    code = FILTER_MODES[options.filter_mode][0]
    if code == 1:
        return {"FILTER": 1, "thr_dh": eps / (2 * n_tiles), "thr_split": eps / (2 * n_splits),
                "thr_dw": eps / n_row_blocks}
    return {"FILTER": code, "thr_dh": eps, "thr_split": 0.0, "thr_dw": eps}


def _gradient_buffers(hidden, weight, needs: tuple[bool, bool, bool], options: OpOptions):
    """(dH, dW, db) accumulation buffers, zeroed; None where that gradient is not wanted."""
    need_hidden, need_weight, need_bias = needs
    acc = GRAD_ACCUM[options.grad_accum] or hidden.dtype
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
    return dh, dw, db


def backward_launch(
    hidden, weight, bias, targets, rows, lse, split_mass, grad, cfg: TritonConfig,
    buffers: tuple, options: OpOptions,
) -> KernelLaunch:
    """The backward's launch over K > 0 logical rows, adding into buffers (_gradient_buffers); grad fp32."""
    dh, dw, db = buffers
    m_rows = hidden.shape[0] if rows is None else rows.shape[0]
    vocab, dim = weight.shape
    dummy = torch.empty(1, dtype=torch.float32, device=hidden.device)
    n_row_blocks, n_tiles = triton.cdiv(m_rows, cfg.block_m), triton.cdiv(vocab, cfg.block_v)
    return KernelLaunch(
        _backward_kernel,
        (n_row_blocks * n_tiles,),
        (
            hidden, weight, bias if bias is not None else dummy, targets, rows if rows is not None else targets,
            lse, grad, dh if dh is not None else dummy, dw if dw is not None else dummy,
            db if db is not None else dummy, split_mass,
            m_rows, vocab, dim, _vocab_splits(vocab, cfg.block_v)[1],
        ),
        dict(
            stride_hm=hidden.stride(0), stride_hd=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1), stride_t=targets.stride(0),
            stride_g=grad.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_M=cfg.group_m,
            DOT_PRECISION=_dot_precision(hidden.dtype), HAS_ROWS=rows is not None,
            COMPUTE_DH=dh is not None, COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **_filter_args(options, n_row_blocks, n_tiles, split_mass.shape[0]),
            **_head_args(options.transform, bias),
        ),
    )


def _launch_backward(
    hidden, weight, bias, targets, rows, lse, split_mass, grad_out, cfg: TritonConfig,
    needs: tuple[bool, bool, bool], options: OpOptions,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """needs = (hidden, weight, bias) gradients wanted -> those gradients (None where not).

    Buffers: dH [N, D] and dW [V, D] in GRAD_ACCUM[options.grad_accum] (fp32 by default), zeroed, filled
    by atomics and cast once; ignored rows of dH stay zero (no scatter). A frozen weight allocates no dW
    and compiles the dW product out (COMPUTE_DW): the sDPO backward is the recompute plus dH only."""
    dh, dw, db = buffers = _gradient_buffers(hidden, weight, needs, options)

    def cast(buf: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        return buf.to(like.dtype) if buf is not None and like is not None else None

    m_rows = hidden.shape[0] if rows is None else rows.shape[0]
    if m_rows > 0:
        grad = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
        backward_launch(hidden, weight, bias, targets, rows, lse, split_mass, grad, cfg, buffers, options).run()
    return cast(dh, hidden), cast(dw, weight), cast(db, bias)


class TritonLinearLogprobs(torch.autograd.Function):
    """Saves the inputs, the valid-row index and lse [K]; the backward kernel recomputes logits tiles.
    Output: [N] log-probs, 0 at rows outside `rows` (their gradient is zero)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, options, cfg):  # type: ignore[override]
        logp, lse, split_mass = _launch_forward(hidden, weight, bias, targets, rows, options.transform, cfg)
        if rows is not None:  # a device-side scatter of K floats: no host sync, no [N, D] copy
            logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_copy_(0, rows, logp)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse, split_mass)
        ctx.options, ctx.cfg = options, cfg
        return logp

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, rows, lse, split_mass = ctx.saved_tensors
        # A frozen weight (or bias) compiles COMPUTE_DW (COMPUTE_DB) out: no dW (db) work at all.
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_h, grad_w, grad_b = _launch_backward(
            hidden, weight, bias, targets, rows, lse, split_mass, grad_out, ctx.cfg, needs, ctx.options
        )
        return grad_h, grad_w, grad_b, None, None, None, None


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
    """configs.select_triton_config for this device, by the estimate: None when no config can fit its shared
    memory (linear_logprobs then runs impl="torch"). The op's launches take fitting_default_config."""
    return select_triton_config(dtype, device_smem_limit(device))


def _meta(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def call_launches(
    cfg: TritonConfig, hidden, weight, bias, targets, rows, options: OpOptions, needs: tuple[bool, bool, bool],
) -> list[KernelLaunch]:
    """The launches one call makes with tile cfg: the forward, and the backward when a gradient is wanted
    (needs: hidden, weight, bias). Built over meta tensors of the same shapes, strides and dtypes: the
    JIT specialises on those (and on 16-byte alignment, which every CUDA allocation has), never on values,
    so compiling these is compiling the real launches, and building them allocates nothing."""
    h, w, b, t, r = (_meta(x) for x in (hidden, weight, bias, targets, rows))
    if (hidden.shape[0] if rows is None else rows.shape[0]) == 0:
        return []  # nothing is launched
    forward, parts = forward_launch(h, w, b, t, r, options.transform, cfg)
    if not any(needs):
        return [forward]
    grad = torch.empty(hidden.shape[0], dtype=torch.float32, device="meta")
    buffers = _gradient_buffers(h, w, needs, options)
    return [forward, backward_launch(h, w, b, t, r, parts[0, 0], parts[1], grad, cfg, buffers, options)]


_SIZE_CHECK_FAILED: list[str] = []  # the first failure of the compiled-size check, warned about once


def compiled_shared_bytes(launches: list[KernelLaunch]) -> int | None:
    """The largest shared memory the compiler gives these launches (CompiledKernel.metadata.shared), from a
    compile for the current CUDA device without launching (JIT warmup; the real launch reuses it from the
    JIT's cache). None, with one warning, where the compile fails: the caller falls back on the estimate
    (and the launch would raise the compiler's error itself)."""
    sizes = [0]
    try:
        for launch in launches:
            compiled = launch.compile()
            compiled = compiled.result() if hasattr(compiled, "result") else compiled  # async compile mode
            sizes.append(int(compiled.metadata.shared))
    except Exception as exc:  # any compile failure: the estimate decides, and the launch reports it
        if not _SIZE_CHECK_FAILED:
            _SIZE_CHECK_FAILED.append(repr(exc))
            warnings.warn(f"lowmem_sdpo_kernels: shared-memory check by compiling failed ({exc!r:.200}); "
                          "configs are judged by the estimate", RuntimeWarning, stacklevel=2)
        return None
    return max(sizes)


_FIT_CACHE: dict[tuple, TritonConfig | None] = {}


def _launch_key(hidden, weight, bias, targets, rows, options: OpOptions, needs) -> tuple:
    """What the fit of a config can depend on: every compile-time property of the launches (dtypes,
    constexpr flags, and which sizes / strides are 1 or multiples of 16, as the JIT specialises them), the row
    count aside (_rows_to_16)."""
    ints = (*hidden.shape[1:], weight.shape[0], *hidden.stride(), *weight.stride(), *targets.stride())
    return (
        hidden.device, hidden.dtype, needs, rows is None, bias is None, options.filter_eps is None,
        options.filter_mode, options.grad_accum, options.transform.has_scale, options.transform.has_softcap,
        tuple((x == 1, x % 16 == 0) for x in ints),
    )


def _rows_to_16(t: torch.Tensor | None) -> torch.Tensor | None:
    """A meta stand-in with the row count rounded up to a multiple of 16 (strides kept): the JIT's most
    specialised launch, so the choice is one per model and settings, never one per batch size (the reference
    pass and training, with other batches, get the same tile)."""
    if t is None:
        return None
    n = max(16, -(-t.shape[0] // 16) * 16)
    return torch.empty_strided((n, *t.shape[1:]), t.stride(), dtype=t.dtype, device="meta")


def fitting_default_config(hidden, weight, bias, targets, rows, options: OpOptions) -> TritonConfig | None:
    """The first of TRITON_CONFIGS_BY_DTYPE that fits this device by the compiler's count (fitting_configs),
    for this call's launches; the estimate's choice off CUDA. Cached per _launch_key."""
    limit = device_smem_limit(hidden.device)
    if limit is None:
        return default_config(hidden.dtype, hidden.device)
    # The backward is checked even where none will run (no_grad, a frozen hidden): the reference pass must get the
    # tile training gets, or the two log-probs of one sequence would differ by their reduction order.
    needs = (True, weight.requires_grad, bias is not None and bias.requires_grad)
    key = _launch_key(hidden, weight, bias, targets, rows, options, needs)
    if key not in _FIT_CACHE:
        h, t, r = _rows_to_16(hidden), _rows_to_16(targets), _rows_to_16(rows)
        candidates = fitting_configs(
            TRITON_CONFIGS_BY_DTYPE[hidden.dtype], hidden.dtype, limit,
            lambda c: compiled_shared_bytes(call_launches(c, h, weight, bias, t, r, options, needs)),
        )
        _FIT_CACHE[key] = next(candidates, None)
    return _FIT_CACHE[key]


_AUTOTUNE_CACHE: dict[tuple, TritonConfig] = {}


def time_configs(
    configs: Iterable[TritonConfig], bench: Callable[[TritonConfig], float]
) -> dict[TritonConfig, float]:
    """bench(cfg) -> ms for each config; a config the compiler cannot fit (OutOfResources: registers or
    shared memory) is left out. Anything else (a CUDA fault, a bug) propagates: timing it away would
    hide it."""
    timings: dict[TritonConfig, float] = {}
    for cfg in configs:
        try:
            timings[cfg] = bench(cfg)
        except OutOfResources:
            continue
    return timings


def autotune_config(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    rows: torch.Tensor | None, options: OpOptions,
) -> TritonConfig:
    """Time forward+backward for each of AUTOTUNE_TRITON_CONFIGS that fits the device (fitting_configs: the
    compiler's count, before any launch) on CUDA and keep the fastest per (power-of-two K bucket, V, D,
    dtype, weight-grad) key. Off unless asked for."""
    need_w = weight.requires_grad
    k_rows = hidden.shape[0] if rows is None else rows.shape[0]
    key = (triton.next_power_of_2(k_rows), weight.shape[0], hidden.shape[1], hidden.dtype, need_w)
    if key in _AUTOTUNE_CACHE:
        return _AUTOTUNE_CACHE[key]
    fallback = fitting_default_config(hidden, weight, bias, targets, rows, options)
    if not hidden.is_cuda or fallback is None:
        return fallback
    from triton.testing import do_bench  # only the tuner needs it
    limit = device_smem_limit(hidden.device)
    grad = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    needs = (True, need_w, bias is not None and bias.requires_grad)

    def compiled_bytes(cfg: TritonConfig) -> int | None:
        return compiled_shared_bytes(call_launches(cfg, hidden, weight, bias, targets, rows, options, needs))

    def bench(cfg: TritonConfig) -> float:
        def run() -> None:
            _, lse, split_mass = _launch_forward(hidden, weight, bias, targets, rows, options.transform, cfg)
            _launch_backward(hidden, weight, bias, targets, rows, lse, split_mass, grad, cfg, needs, options)
        return do_bench(run, warmup=5, rep=20)

    with torch.no_grad():
        timings = time_configs(fitting_configs(AUTOTUNE_TRITON_CONFIGS, hidden.dtype, limit, compiled_bytes), bench)
    best = min(timings, key=timings.__getitem__) if timings else fallback
    _AUTOTUNE_CACHE[key] = best
    return best


def triton_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: OpOptions,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N] -> [N] fp32 log-probs. rows: [K]
    int64 indices of the rows to compute (their targets all in [0, V)); the others give 0 and zero
    gradient. None: every row, every target valid. Strided hidden / weight / targets are read in place."""
    if hidden.dtype not in _TL_DTYPES:
        raise ValueError(f"impl='triton' supports float16, bfloat16 and float32, got {hidden.dtype}")
    cfg = options.triton_config
    if cfg == "autotune":
        cfg = autotune_config(hidden, weight, bias, targets, rows, options)
    elif cfg is None:
        cfg = fitting_default_config(hidden, weight, bias, targets, rows, options)
    elif not isinstance(cfg, TritonConfig):
        raise ValueError(f"triton_config must be a TritonConfig, 'autotune' or None, got {cfg!r}")
    if cfg is None:  # linear_logprobs falls back to impl="torch" before getting here
        raise ValueError(
            f"no Triton config fits {device_smem_limit(hidden.device)} B of shared memory for {hidden.dtype}"
        )
    if options.grad_accum not in GRAD_ACCUM:
        raise ValueError(f"grad_accum must be one of {sorted(GRAD_ACCUM)}, got {options.grad_accum!r}")
    if bias is not None:
        bias = bias.contiguous()  # the kernels index it as one stride-1 row
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets, rows, options, cfg)
