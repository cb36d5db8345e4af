"""Fused Triton implementation (CCE-style): lm-head matmul, log-softmax and target pick in one pass.

Tier 1: @triton.jit kernels, triton_forward.py and triton_backward.py (each with its launch; the helpers they
share in triton_tiles.py, the host side they share in triton_launch.py). Tier 2: TritonLinearLogprobs
(autograd.Function). Tier 3: triton_linear_logprobs, the core the public linear_logprobs dispatches to, with
the tile choice: the first config that fits the device's shared memory by the compiler's count
(fitting_default_config), or the fastest one timed (autotune_config, triton_config="autotune").

The forward stores 3 floats per row and vocabulary split, merged into the log-sum-exp on the host; the
backward recomputes each logits tile and adds into the gradient buffers with atomics. No logits leave
registers (the docstrings of triton_forward.py and triton_backward.py have the details).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .configs import (
    AUTOTUNE_TRITON_CONFIGS,
    GRAD_ACCUM,
    TRITON_CONFIGS_BY_DTYPE,
    OpOptions,
    TritonConfig,
    fitting_configs,
    select_triton_config,
)
from .triton_backward import _gradient_buffers, _launch_backward, backward_launch
from .triton_forward import _launch_forward, forward_launch
from .triton_launch import KernelLaunch

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


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
