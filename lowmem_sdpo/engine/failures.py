"""How a run stops when something goes wrong mid-way: each failure is one exception with an exit code.

The CLI prints the message (one paragraph, no traceback unless --debug). In every case the checkpoints
already written stay: `--resume` continues from the last good one.
"""

from __future__ import annotations


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
