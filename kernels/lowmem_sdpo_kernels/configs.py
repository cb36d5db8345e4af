"""Every tunable number of the kernels, in one place.

Tiers below import from here; nothing else in the package hard-codes a block size.

Memory arithmetic (why no N x V tensor exists anywhere):
  * torch impl: one (rows x vocab) chunk of fp32 logits at a time, ROWS * VOCAB * 4 bytes
    (2048 * 4096 * 4 = 32 MiB), plus the fp32 copy of one weight chunk (VOCAB * D * 4 = 64 MiB at
    D=4096) and of one hidden chunk (ROWS * D * 4 = 32 MiB). The chunk sizes are fixed, so this
    workspace does not grow with N or V; per-row state (running max, running sum, target logit,
    log-sum-exp) is O(N).
  * triton impl: a logits tile lives in registers (BLOCK_M x BLOCK_V fp32); global memory holds
    per-row partial (max, sum, target logit) for each vocabulary split, 3 * n_splits * N * 4 bytes,
    with n_splits <= MAX_VOCAB_SPLITS, i.e. O(N).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .logit_transform import LogitTransform


@dataclass(frozen=True)
class TorchChunks:
    """Chunk sizes for the plain-torch implementation (rows of hidden x entries of vocabulary)."""

    rows: int = 2048
    vocab: int = 4096


TORCH_CHUNKS = TorchChunks()


@dataclass(frozen=True)
class TritonConfig:
    """Tile shape of the Triton kernels. Forward and backward use the same one, so the backward
    recomputes every logit with the same reduction order over D as the forward did."""

    block_m: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3


# Used on the first call (no autotuning stall). 64 x 128 tiles with 64-wide K steps fit the
# register file at fp32 accumulation for bf16/fp16 on sm80+ (64*128*4 B = 32 KiB of accumulator).
DEFAULT_TRITON_CONFIG = TritonConfig()

# Tried only when autotune=True is requested (off by default): the benchmark script sweeps these.
AUTOTUNE_TRITON_CONFIGS: tuple[TritonConfig, ...] = (
    TritonConfig(64, 128, 64, 8, 3),
    TritonConfig(128, 128, 64, 8, 3),
    TritonConfig(128, 64, 64, 4, 3),
    TritonConfig(64, 256, 32, 8, 3),
    TritonConfig(128, 256, 64, 8, 2),
)

# The forward splits the vocabulary across at most this many programs per row block, so a row
# block's work is spread over SMs even when N is small (N=4096 -> 64 row blocks of 64).
MAX_VOCAB_SPLITS = 16

# Gradient filtering (backward only). filter_eps is a per-row budget of dropped softmax mass: a
# vocabulary tile (chunk) of width w is skipped only when, for every row in the tile, the tile's
# total softmax mass is below filter_eps / n_tiles and no row's target lies in it. Summed over the
# skipped tiles a row therefore loses at most filter_eps of probability mass, so the error of its
# hidden-state gradient is at most |grad_out| * filter_eps * max_v |weight[v]|, and of a weight row
# at most filter_eps * |grad_out| * |hidden| summed over rows. "auto" picks the dtype's machine
# epsilon, the size of one rounding of the result, and turns filtering off for fp32/fp64.
# With a head transform (logit_transform.py) the mass bound is still on p = softmax(z) of the final
# logits; the dropped d logp / d x entries are g * scale * (1 - tanh^2) * p, so both error bounds
# gain a factor |scale| (the softcap derivative is <= 1), and the bias gradient of entry v moves by
# at most |scale| * sum over rows of |g_n| * p_nv, i.e. filter_eps * |scale| * sum_n |g_n| in total.
AUTO_FILTER_EPS: dict[torch.dtype, float | None] = {
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,  # 2**-7
    torch.float16: torch.finfo(torch.float16).eps,  # 2**-10
    torch.float32: None,
    torch.float64: None,
}


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """Turn the public filter_eps keyword into a number (or None = no filtering)."""
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be a float, None or 'auto', got {filter_eps!r}")
        return AUTO_FILTER_EPS.get(dtype)
    value = float(filter_eps)
    if not value >= 0.0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps!r}")
    return value if value > 0.0 else None


@dataclass(frozen=True)
class OpOptions:
    """Per-call options handed from the public functions to every implementation's core."""

    filter_eps: float | None = None  # already resolved (no "auto")
    # Triton only: None = DEFAULT_TRITON_CONFIG; "autotune" = time AUTOTUNE_TRITON_CONFIGS once per
    # shape key on CUDA and keep the fastest; or an explicit TritonConfig.
    triton_config: TritonConfig | str | None = None
    # Scale and softcap of the head (identity by default); the bias travels as a tensor argument.
    transform: LogitTransform = field(default_factory=LogitTransform)
