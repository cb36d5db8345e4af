"""Triton helpers the forward and backward kernels share (triton_forward.py, triton_backward.py): the
logits tile, the head transform, the grouped launch order and the valid-row lookup.

Head transform (logit_transform.py): the fp32 tile x = H W^T gets + bias, * scale and the softcap
c * tanh(y / c) in registers, each only when present (constexpr flags: the identity head compiles
to exactly the kernel that existed before). _head_logits is shared by forward and backward.

Launch order (issue 13): both grids are 1-D and numbered by _grouped_tile, so GROUP_M row blocks
walk the vocabulary together and a wave of resident programs shares their hidden / dH rows and a
few weight tiles in L2 (benchmarks/README.md, "HBM traffic", has the arithmetic).

Ignored rows: with a valid-row index ROWS (HAS_ROWS), program row k is physical row ROWS[k] of
hidden, targets, grad and dH; partials and lse are per logical row. Nothing is compacted or
scattered, and offsets are int64 (row * stride never wraps).
"""

from __future__ import annotations

import triton
import triton.language as tl


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


def grouped_order(pid: int, n_m: int, n_v: int, group_m: int) -> tuple[int, int]:
    """Host mirror of _grouped_tile (tests check it is a bijection and that the kernels use it)."""
    per_group = group_m * n_v
    first_m = (pid // per_group) * group_m
    size = min(n_m - first_m, group_m)
    local = pid % per_group
    return first_m + local % size, local // size

