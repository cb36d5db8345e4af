"""Device, dtypes and memory: the few places where CPU and CUDA runs differ.

What the card can do is read from torch.cuda in one place (`cuda_caps`) into a `DeviceCaps`; every rule
(which compute dtype `auto` means, whether the Triton kernels may run) takes the caps as an argument, so the
rules are tested on CPU with the capabilities of cards the test machine does not have.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass
from typing import Protocol

import torch

from lowmem_sdpo.errors import InputError

# Triton's bf16 code paths need Ampere (sm80) or newer; below Volta (sm70) Triton does not run at all.
TRITON_MIN_CAPABILITY = (7, 0)
TRITON_BF16_MIN_CAPABILITY = (8, 0)
HALF_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class DeviceCaps:
    """What a CUDA card supports, as far as the dtype and kernel choices care."""

    capability: tuple[int, int]  # (major, minor): sm75 is (7, 5)
    bf16: bool  # native bfloat16 (not torch's emulation, which pre-Ampere cards would otherwise report)
    name: str = "CUDA device"

    def describe(self) -> str:
        return f"{self.name}, compute capability {self.capability[0]}.{self.capability[1]}"


def _native_bf16() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no emulation, no argument
        return bool(torch.cuda.is_bf16_supported())


def cuda_caps(device: torch.device) -> DeviceCaps:
    """The one place that queries the card."""
    major, minor = torch.cuda.get_device_capability(device)
    return DeviceCaps(capability=(major, minor), bf16=_native_bf16(), name=torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    compute_dtype: str  # the 4-bit layers' compute dtype and the dtype of the non-quantised weights
    caps: DeviceCaps | None = None  # None on CPU

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16's narrow exponent underflows small gradients: the trainer scales the loss (torch.amp.GradScaler)
        exactly when training runs in float16; bf16 and fp32 share fp32's exponent range and need none."""
        return self.compute_dtype == "float16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA (the LoRA factors stay fp32, their matmuls run in the compute dtype)."""
        if self.is_cuda and self.compute_dtype in HALF_DTYPES:
            return torch.autocast("cuda", dtype=getattr(torch, self.compute_dtype))
        return contextlib.nullcontext()


def compute_dtype_for(requested: str, caps: DeviceCaps | None) -> str:
    """`auto` -> bfloat16 on a card with native bf16, float16 on other cards, float32 on CPU (CPU bf16
    matmuls are slow and lossy on most CPUs; the tiny demo and the CPU tests use fp32). An explicit bfloat16 on
    a card without it is refused: torch would emulate it, slowly, or bitsandbytes would fail mid-run."""
    if requested == "auto":
        if caps is None:
            return "float32"
        return "bfloat16" if caps.bf16 else "float16"
    if requested == "bfloat16" and caps is not None and not caps.bf16:
        raise InputError(
            f"--compute-dtype bfloat16: the card ({caps.describe()}) has no native bfloat16 "
            "(needs compute capability 8.0+); use --compute-dtype float16 or auto"
        )
    return requested


class DeviceRequest(Protocol):
    """What resolve_hardware reads from a pipeline's settings (engine.config.RunConfig has both fields): the
    runtime takes the two fields, not the settings type, so it does not depend on the pipelines above it."""

    device: str  # "auto", "cpu" or "cuda"
    compute_dtype: str  # "auto", "float32", "bfloat16" or "float16"


def resolve_hardware(config: DeviceRequest, caps: DeviceCaps | None = None) -> Hardware:
    """`caps` overrides the queried card (tests); it is ignored on CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return Hardware(
            device=torch.device("cpu"), compute_dtype=compute_dtype_for(config.compute_dtype, None)
        )
    device = torch.device("cuda", torch.cuda.current_device())
    caps = caps or cuda_caps(device)
    return Hardware(device=device, compute_dtype=compute_dtype_for(config.compute_dtype, caps), caps=caps)


def _triton_refusal(hw: Hardware) -> str | None:
    """Why the Triton kernels cannot run on this CUDA card in this dtype, or None when they can."""
    caps = hw.caps
    if not hw.is_cuda or caps is None:
        return None
    if caps.capability < TRITON_MIN_CAPABILITY:
        return f"Triton needs compute capability 7.0+, the card is {caps.describe()}"
    if hw.compute_dtype == "bfloat16" and caps.capability < TRITON_BF16_MIN_CAPABILITY:
        return f"Triton's bfloat16 kernels need compute capability 8.0+, the card is {caps.describe()}"
    return None


def kernel_impl_for(hw: Hardware, requested: str) -> str:
    """The log-prob implementation to hand to lowmem_sdpo_kernels.resolve_impl: `auto` becomes "torch" on a
    card the Triton path cannot run in this dtype (else stays `auto`); an explicit "triton" there is refused.
    Other names pass through unchanged (resolve_impl validates them)."""
    reason = _triton_refusal(hw)
    if reason is None:
        return requested
    if requested == "auto":
        return "torch"
    if requested == "triton":
        raise InputError(f"--logprob-impl triton: {reason}; use --logprob-impl torch or auto")
    return requested


def resolve_logprob_impl(hw: Hardware, requested: str, *, source: str = "--logprob-impl") -> str:
    """The implementation lowmem_sdpo_kernels will run for `requested` on this hardware ("torch", "triton",
    ...); an unknown or unavailable one is an InputError naming `source` (the flag, or the file it was read
    from)."""
    from lowmem_sdpo_kernels import resolve_impl  # here: importing the kernels imports triton

    try:
        return resolve_impl(kernel_impl_for(hw, requested), torch.empty(0, device=hw.device))
    except ValueError as err:
        raise InputError(f"{source} {requested}: {err}") from err


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
