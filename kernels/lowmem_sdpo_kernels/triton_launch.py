"""Host side shared by the Triton forward's and backward's launches: KernelLaunch (one launch, built but
not yet run) and the arguments both kernels take the same way (dot precision, head transform)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .logit_transform import LogitTransform


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (no silent TF32); fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


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

