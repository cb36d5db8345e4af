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
    with n_splits <= MAX_VOCAB_SPLITS, i.e. O(N). The backward's only large buffers are the
    gradients themselves: dH [N, D] (fp32, or the input dtype under grad_accum="input": at N 16384,
    D 4096 268 MB / 134 MB) and, only for a trained lm head, dW [V, D] (524 MB fp32 at V 32000).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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
    # Row blocks that walk the vocabulary together (launch order, triton_tiles._grouped_tile). It
    # changes which tiles share the L2, never a value: every tile's arithmetic is the same.
    group_m: int = 8


# First choice for fp32 (no autotuning stall), and the interpreter's tile. 64 x 128 tiles with 64-wide
# K steps: 64*128*4 B = 32 KiB of fp32 accumulator.
DEFAULT_TRITON_CONFIG = TritonConfig()

# First choice for bf16/fp16 (issue 13): 128-row blocks halve how often each weight tile is read
# (N / BLOCK_M times) and give 2*128*128 / ((128 + 128) * 2) = 64 FLOP per byte loaded per K step,
# against 43 for 64 x 128. Registers, as ptxas allocates them (benchmarks/kernel_resources.py compiles
# every config on a CPU as the JIT specialises a launch, and reads the cubin's register and stack use;
# Triton 3.6, sm90): at 8 warps the [128, 128] fp32 logits accumulator alone is 64 of a thread's 255
# registers; the backward adds p, the bf16 dz tile kept across the D loop, the [128, BLOCK_D] products and
# the K-step operands. At BLOCK_D = 32 the forward takes 204 registers, the frozen-weight (sDPO) backward
# with the filter 176 and the trained-weight backward 198-244, none spilling (compiled without the run-time
# specialisation, as first measured, they sat at 254-255 and spilled at BLOCK_D = 64). 128 x 256 tiles
# spill at 16 warps: offered to the autotuner only. Shared memory, compiled: 49,152 B for the forward and
# 49,152-98,304 B for the backward on sm90 (32,768-81,920 B on sm80 / sm86): it fits all three.
HALF_TRITON_CONFIG = TritonConfig(128, 128, 32, 8, 3)

# ---- Shared memory: which tile fits which card ----
# Triton software-pipelines the K loop of the logits tile: each of num_stages stages buffers one
# [BLOCK_M, BLOCK_D] tile of H and one [BLOCK_D, BLOCK_V] tile of W, in the input dtype. The backward
# also stages its [BLOCK_M, BLOCK_V] dz tile (input dtype) to feed the dz @ W and dz^T @ H dots. So a
# block needs at most
#     smem = num_stages * (BLOCK_M * BLOCK_D + BLOCK_D * BLOCK_V) * elsize + BLOCK_M * BLOCK_V * elsize
# (the forward needs no more than the first term). The default tile:
#     fp32 (4 B):       3 * (64*64 + 64*128) * 4 + 64*128*4 = 147,456 + 32,768 = 180,224 B
#     bf16/fp16 (2 B):  3 * (64*64 + 64*128) * 2 + 64*128*2 =  73,728 + 16,384 =  90,112 B
# against the per-block opt-in limits (torch.cuda.get_device_properties(d).shared_memory_per_block_optin)
#     sm80 (A100) 166,912 B;  sm86 / sm89 (RTX 30xx / 40xx) 101,376 B;  sm90 (H100) 232,448 B.
# It is an estimate, NOT a bound: the compiler decides the layouts, and what it allocates at run time is
# often more. Compiled as the JIT compiles a launch (unit strides constant, sizes divisible by 16:
# benchmarks/kernel_resources.py, benchmarks/results/kernel_resources_compiled.json, Triton 3.6), the bf16
# default tile's trained-weight backward needs 98,304 B on sm90 against the estimate's 81,920, and
# 128 x 256 x 32 at 3 stages 237,568 B against 139,264 (sm90 stages dz for both wgmma products and
# pipelines the second D loop too); elsewhere it is less (fp32 at the default tile: 147,456 B on all three,
# so it fits an A100 too). So the estimate only orders configs and stands in where no compiler count can be
# had (the CPU, a failed compile): on CUDA every config is checked against the compiler's own count before
# its first launch (fitting_configs, with triton_logprobs.compiled_shared_bytes), and OutOfResources during
# autotuning skips that config.
ELEMENT_SIZE: dict[torch.dtype, int] = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def shared_memory_bytes(cfg: TritonConfig, dtype: torch.dtype) -> int:
    """Estimate of the shared memory one block of the backward kernel needs (above): it orders configs and
    stands in where no compiler count can be had; it never proves that one fits (fitting_configs does)."""
    size = ELEMENT_SIZE[dtype]
    pipelined = cfg.num_stages * (cfg.block_m * cfg.block_d + cfg.block_d * cfg.block_v) * size
    return pipelined + cfg.block_m * cfg.block_v * size


# Per dtype, in order of preference: the first that fits the device's limit is used. Estimates:
#   fp32: 180,224 (H100) > 131,072 (A100: 2 stages) > 81,920 (RTX 30xx/40xx: 32-wide K steps) > 32,768
#   bf16/fp16: 81,920 (all three) > 53,248 > 16,384
_HALF_CONFIGS = (HALF_TRITON_CONFIG, TritonConfig(64, 128, 32, 8, 3), TritonConfig(32, 64, 32, 4, 2))
TRITON_CONFIGS_BY_DTYPE: dict[torch.dtype, tuple[TritonConfig, ...]] = {
    torch.float32: (
        DEFAULT_TRITON_CONFIG,
        TritonConfig(64, 128, 64, 8, 2),
        TritonConfig(64, 128, 32, 8, 2),
        TritonConfig(32, 64, 32, 4, 2),
    ),
    torch.float16: _HALF_CONFIGS,
    torch.bfloat16: _HALF_CONFIGS,
}


def select_triton_config(dtype: torch.dtype, smem_limit: int | None) -> TritonConfig | None:
    """The first of TRITON_CONFIGS_BY_DTYPE[dtype] whose estimate (shared_memory_bytes) fits smem_limit
    (bytes per block); None if none does. smem_limit None (no CUDA device: the interpreter) takes
    DEFAULT_TRITON_CONFIG, the tile the CPU tests were sized for. By the estimate: on CUDA the op takes
    the first of the list that fits by the compiler's count instead (fitting_configs)."""
    if smem_limit is None:
        return DEFAULT_TRITON_CONFIG
    for cfg in TRITON_CONFIGS_BY_DTYPE[dtype]:
        if shared_memory_bytes(cfg, dtype) <= smem_limit:
            return cfg
    return None


def fitting_configs(
    configs: Iterable[TritonConfig], dtype: torch.dtype, smem_limit: int | None,
    compiled_bytes: Callable[[TritonConfig], int | None],
) -> Iterator[TritonConfig]:
    """The configs, in order, that fit smem_limit (bytes per block; None: no limit known, all of them).
    compiled_bytes(cfg) is the compiler's own count for the launches a call makes with cfg (the largest of
    them); only where it could not be had (None) does the estimate decide. Lazy: taking the first compiles
    only up to it."""
    for cfg in configs:
        if smem_limit is None:
            yield cfg
            continue
        size = compiled_bytes(cfg)
        if (shared_memory_bytes(cfg, dtype) if size is None else size) <= smem_limit:
            yield cfg


# Tried only when triton_config="autotune" is requested (off by default): the benchmark script sweeps
# these, through fitting_configs (a config over the device's limit is never launched). The K=64 and
# 128 x 256 tiles spill in the backward but may still win where the spill is cheap. 128 x 256 x 32 runs at
# 2 stages: its trained-weight backward needs 212,992 B on sm90 compiled (237,568 B at 3 stages, over
# sm90's 232,448); 128 x 256 x 64 was dropped (294,912 B at 2 stages, 344,064 B at 3).
# Group sizes 1 (the old row-fastest order), 4 and 16 are there to measure the launch order.
AUTOTUNE_TRITON_CONFIGS: tuple[TritonConfig, ...] = (
    HALF_TRITON_CONFIG,
    TritonConfig(128, 128, 32, 8, 3, group_m=1),
    TritonConfig(128, 128, 32, 8, 3, group_m=4),
    TritonConfig(128, 128, 32, 8, 3, group_m=16),
    TritonConfig(64, 128, 64, 8, 3),
    TritonConfig(128, 128, 64, 8, 3),
    TritonConfig(128, 64, 64, 4, 3),
    TritonConfig(128, 256, 32, 16, 2),
)

# The forward splits the vocabulary across at most this many programs per row block, so a row
# block's work is spread over SMs even when N is small (N=4096 -> 64 row blocks of 64).
MAX_VOCAB_SPLITS = 16

# Gradient filtering (backward only), filter="bound". filter_eps is a per-row budget of dropped
# softmax mass: a vocabulary tile (chunk) of width w is skipped only when, for every row in the tile,
# the tile's total softmax mass is below filter_eps / n_tiles and no row's target lies in it. Summed
# over the skipped tiles a row therefore loses at most filter_eps of probability mass, so the error
# of its hidden-state gradient is at most |grad_out| * filter_eps * max_v |weight[v]|. The Triton
# kernel splits that budget in two halves (issue 13): a row may skip a tile whose mass is under
# filter_eps / (2 n_tiles), and every tile of a vocabulary split whose whole mass (known per row and
# split from the forward's partials) is at most filter_eps / (2 n_splits); summed, at most
# filter_eps again, so the same bound holds. It tests the dW product of a tile apart: skipped when every vocabulary column's
# mass summed over the tile's rows is below filter_eps / n_row_blocks, so a weight row loses at most
# filter_eps of summed mass and errs by at most filter_eps * max|grad_out| * max|hidden|. (The torch
# impl skips both products of a chunk on the row test; its weight rows then err by at most
# filter_eps * |grad_out| * |hidden| summed over rows.) "auto" picks the dtype's machine
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


# The opt-in per-element rule (filter="element", CCE's): a target-free tile's products are skipped when
# every softmax entry p < filter_eps. Each dropped d logp / d z entry is then below |g_n| * filter_eps,
# so the error of hidden row n is at most |g_n| * |scale| * sum over the dropped entries of p_nv *
# |W_v|_inf (and of weight row v at most |scale| * sum_n |g_n| p_nv |h_n|_inf): no per-row budget, so
# it can reach |g_n| * filter_eps * V * max|W| in the worst case, but on LM-like rows (a few tokens
# hold the mass) it is the sum of what the rule dropped, which tests/unit/kernels/test_kernels_filter.py checks
# entry by entry against float64. "auto": 2**-12 for bf16/fp16 (CCE's default), off for fp32/fp64.
AUTO_ELEMENT_EPS: dict[torch.dtype, float | None] = {
    torch.bfloat16: 2.0**-12,
    torch.float16: 2.0**-12,
    torch.float32: None,
    torch.float64: None,
}

# filter= name -> (kernel code, table of "auto" thresholds). 0 is "no filter" in the kernels.
FILTER_MODES: dict[str, tuple[int, dict[torch.dtype, float | None]]] = {
    "bound": (1, AUTO_FILTER_EPS),
    "element": (2, AUTO_ELEMENT_EPS),
}

# grad_accum= name -> dtype of the backward's atomic accumulators (None: the input dtype). fp32 is
# the default and the only choice the error rules assume; "input" (CCE's bf16 atomics) halves the
# atomic traffic and the dH / dW buffers at the cost of a bf16 rounding per atomic add.
GRAD_ACCUM: dict[str, torch.dtype | None] = {"fp32": torch.float32, "input": None}


def resolve_filter_eps(
    filter_eps: float | str | None, dtype: torch.dtype, mode: str = "bound"
) -> float | None:
    """Turn the public filter_eps keyword into a number (or None = no filtering)."""
    if mode not in FILTER_MODES:
        raise ValueError(f"filter must be one of {sorted(FILTER_MODES)}, got {mode!r}")
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be a float, None or 'auto', got {filter_eps!r}")
        return FILTER_MODES[mode][1].get(dtype)
    value = float(filter_eps)
    if not value >= 0.0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps!r}")
    return value if value > 0.0 else None


@dataclass(frozen=True)
class OpOptions:
    """Per-call options handed from the public functions to every implementation's core."""

    filter_eps: float | None = None  # already resolved (no "auto")
    # Triton only: None = select_triton_config for the dtype and device; "autotune" = time AUTOTUNE_TRITON_CONFIGS once per
    # shape key on CUDA and keep the fastest; or an explicit TritonConfig.
    triton_config: TritonConfig | str | None = None
    # Scale and softcap of the head (identity by default); the bias travels as a tensor argument.
    transform: LogitTransform = field(default_factory=LogitTransform)
    filter_mode: str = "bound"  # a key of FILTER_MODES
    grad_accum: str = "fp32"  # a key of GRAD_ACCUM (Triton only)
