"""Device, dtypes and memory: the few places where CPU and CUDA runs differ."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass

import torch

from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.errors import InputError


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    compute_dtype: str  # the 4-bit layers' compute dtype and the dtype of the non-quantised weights

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA (the LoRA factors stay fp32, their matmuls run in the compute dtype)."""
        if self.is_cuda and self.compute_dtype in ("bfloat16", "float16"):
            return torch.autocast("cuda", dtype=getattr(torch, self.compute_dtype))
        return contextlib.nullcontext()


def resolve_hardware(config: RunConfig) -> Hardware:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = config.compute_dtype
    if dtype == "auto":
        # CPU bf16 matmuls are slow and lossy on most CPUs; the tiny demo and the CPU tests use fp32.
        dtype = "bfloat16" if use_cuda else "float32"
    return Hardware(device=device, compute_dtype=dtype)


def reset_peak(hw: Hardware) -> None:
    if hw.is_cuda:
        torch.cuda.reset_peak_memory_stats(hw.device)


def peak_memory_bytes(hw: Hardware) -> int:
    """GPU: max allocated since the last reset. CPU: the process's max RSS (never reset by the OS)."""
    if hw.is_cuda:
        return int(torch.cuda.max_memory_allocated(hw.device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def current_memory_bytes(hw: Hardware) -> int:
    if hw.is_cuda:
        return int(torch.cuda.memory_allocated(hw.device))
    # Resident set size now (Linux); elsewhere the peak is the best figure the OS gives.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_memory_bytes(hw)
