"""The Triton forward kernel (CCE-style lm-head matmul, log-softmax and target pick in one pass) and its launch.

Forward: program (row block i, vocabulary split s) walks its run of BLOCK_V-wide vocabulary tiles,
computing each [BLOCK_M, BLOCK_V] logits tile in registers (fp32 accumulation over D in BLOCK_D
steps) and folding it into a running (max, sum of exp) and the target logit. Per row and split it
stores 3 floats; the host merges the n_splits partials (n_splits <= MAX_VOCAB_SPLITS) into the
log-sum-exp. Global memory: 3 * n_splits * M * 4 bytes, O(M). No logits leave registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import MAX_VOCAB_SPLITS, TritonConfig
from .logit_transform import LogitTransform
from .triton_launch import KernelLaunch, _dot_precision, _head_args
from .triton_tiles import _grouped_tile, _head_logits, _logits_tile, _row_ids


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


def _vocab_splits(vocab: int, block_v: int) -> tuple[int, int]:
    n_tiles = triton.cdiv(vocab, block_v)
    tiles_per_split = triton.cdiv(n_tiles, min(MAX_VOCAB_SPLITS, n_tiles))
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


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
