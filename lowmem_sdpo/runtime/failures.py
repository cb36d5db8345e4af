"""How a run stops when something goes wrong mid-way: each failure is one exception with an exit code.

The CLI prints the message (one paragraph, no traceback unless --debug). In every case the checkpoints
already written stay: `--resume` continues from the last good one.
"""

from __future__ import annotations

import torch


class TrainingStopped(Exception):
    exit_code = 1


class NonFiniteLoss(TrainingStopped):
    """NaN or Inf loss: the optimiser step is not taken; the last checkpoint is the last good state."""

    exit_code = 3


class OutOfMemory(TrainingStopped):
    exit_code = 4


class RunInterrupted(TrainingStopped):
    """SIGINT / SIGTERM: a checkpoint was written at the last optimiser-step boundary."""

    exit_code = 130


# What lowers peak memory, in the order it usually helps most (printed with an out-of-memory error).
MEMORY_ADVICE: tuple[str, ...] = (
    "--batch-size 1 with a larger --grad-accum (same effective batch, activations for one pair only)",
    "--max-length / --max-prompt-length (activations grow with sequence length)",
    "keep --gradient-checkpointing on (the default)",
    "--logprob-impl triton or torch (never materialise [tokens, vocab] logits)",
    "--lora-r smaller (optimiser state is 2 x the adapter size)",
)


def out_of_memory_message(where: str, peak_bytes: int, breakdown: dict[str, int], detail: str) -> str:
    gib = 1024**3
    parts = ", ".join(f"{name} {value / gib:.2f} GiB" for name, value in breakdown.items())
    advice = "; ".join(MEMORY_ADVICE)
    first = (detail.strip().splitlines() or [""])[0]
    return (
        f"CUDA out of memory during {where}: peak {peak_bytes / gib:.2f} GiB allocated ({parts}). "
        f"Checkpoints written so far are kept; lower memory with: {advice}. Then rerun with --resume. [{first}]"
    )


# Messages of the RuntimeErrors that mean "the GPU ran out of memory" without being torch's OutOfMemoryError:
# an allocation inside a CUDA library, or a raw CUDA call, failed. Each is checked against the text its
# source produces (a substring, so the "when calling `...`" tails and CUDA's hints may follow).
CUDA_OOM_MESSAGES: tuple[str, ...] = (
    # torch's caching allocator; older torch raised it as a plain RuntimeError
    "CUDA out of memory",
    # C10_CUDA_CHECK: "CUDA error: " + cudaGetErrorString(cudaErrorMemoryAllocation) (torch.AcceleratorError)
    "CUDA error: out of memory",
    # TORCH_CUDABLAS_CHECK (ATen/cuda/Exceptions.h): "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling
    # `cublasCreate(handle)`", typically a cuBLAS handle or workspace that no longer fits
    "CUBLAS_STATUS_ALLOC_FAILED",
    # AT_CUDNN_CHECK: "cuDNN error: " + cudnnGetErrorString(status); cuDNN 8 names the status
    # CUDNN_STATUS_ALLOC_FAILED, cuDNN 9 CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED (its host
    # counterpart is CPU memory and is left out)
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    # Triton's launcher (backends/nvidia/driver.c): "Triton Error [CUDA]: " + cuGetErrorString(...)
    "Triton Error [CUDA]: out of memory",
)


def is_cuda_oom(err: BaseException) -> bool:
    """Whether `err` means the GPU ran out of memory: torch's OutOfMemoryError, or a RuntimeError from a
    CUDA library (cuBLAS, cuDNN, the CUDA runtime, Triton) whose message says an allocation failed."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return any(pattern in text for pattern in CUDA_OOM_MESSAGES)
