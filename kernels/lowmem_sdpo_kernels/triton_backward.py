"""The Triton backward kernel (recompute, dz, the dH / dW / db products, the gradient filters) and its launch.

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import FILTER_MODES, GRAD_ACCUM, OpOptions, TritonConfig
from .triton_forward import _vocab_splits
from .triton_launch import KernelLaunch, _dot_precision, _head_args
from .triton_tiles import _grouped_tile, _head_logits, _logits_tile, _row_ids


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
