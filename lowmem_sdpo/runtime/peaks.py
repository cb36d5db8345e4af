"""Peak memory per phase of an sDPO step (materialise, reference, train, save, ...), for summary.json.

    peaks = PhasePeaks(hw)
    with peaks.phase("reference"):
        ...
    summary["peak_memory_bytes_by_phase"] = peaks.as_dict()

On CUDA each phase starts by resetting the allocator's peak counter, so a phase's figure is the most memory
allocated while it ran (its own peak, whatever came before). The CPU figure is the process's max RSS, which
the OS never resets: a CPU phase's figure is the peak of the whole process up to the phase's end, so the
figures are cumulative (non-decreasing) and only a rise from one phase to the next is the later phase's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lowmem_sdpo.runtime.failures import OutOfMemory, is_cuda_oom, out_of_memory_message
from lowmem_sdpo.runtime.hardware import Hardware, peak_memory_bytes, reset_peak


@dataclass
class PhasePeaks:
    hw: Hardware
    peaks: dict[str, int] = field(default_factory=dict)  # phase -> bytes, in the order phases first ran

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measures the block's peak. Recorded also when the block raises: after an out-of-memory error the
        failing phase's figure is the one worth reporting. A phase run twice keeps the larger peak."""
        reset_peak(self.hw)
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0), peak_memory_bytes(self.hw))

    def as_dict(self) -> dict[str, int]:
        """{phase: bytes}, for summary.json's peak_memory_bytes_by_phase."""
        return dict(self.peaks)

    def overall(self) -> int:
        """The step's peak over every phase. On CUDA the phase resets also reset the allocator's own
        max_memory_allocated, which then holds only the last phase's peak: report this instead."""
        return max(self.peaks.values(), default=0)


@contextlib.contextmanager
def out_of_memory_reported(peaks: PhasePeaks, what: str) -> Iterator[None]:
    """A CUDA allocation failure in the block (the allocator's, or cuBLAS / cuDNN / Triton's) becomes
    OutOfMemory: `what` and the phase it ran out in, each phase's peak, and what lowers memory (exit 4)."""
    try:
        yield
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_cuda_oom(err):
            raise
        hw = peaks.hw
        breakdown = {f"peak in {phase}": peak for phase, peak in peaks.as_dict().items()}
        if hw.is_cuda:
            breakdown |= {
                "allocated at failure": torch.cuda.memory_allocated(hw.device),
                "reserved by the caching allocator": torch.cuda.memory_reserved(hw.device),
            }
        where = what + (f" ({next(reversed(peaks.as_dict()))})" if peaks.as_dict() else "")
        raise OutOfMemory(out_of_memory_message(where, peaks.overall(), breakdown, str(err))) from err
