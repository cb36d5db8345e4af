"""Peak memory per phase of an sDPO step (materialise, reference, train, save, ...), for summary.json; and
phase events, which tell a caller of run_sdpo where the run is while it runs.

    peaks = PhasePeaks(hw)
    with peaks.phase("reference"):
        ...
    summary["peak_memory_bytes_by_phase"] = peaks.as_dict()

On CUDA each phase starts by resetting the allocator's peak counter, so a phase's figure is the most memory
allocated while it ran (its own peak, whatever came before). The CPU figure is the process's max RSS, which
the OS never resets: a CPU phase's figure is the peak of the whole process up to the phase's end, so the
figures are cumulative (non-decreasing) and only a rise from one phase to the next is the later phase's own.

Phase events: `run_sdpo(config, phase_listeners=[listener])` calls listener(PhaseEvent) as each span in
PHASE_EVENTS starts and ends, in the run's own thread (benchmarks/bench_e2e.py times and samples its phases
from them; a profiler or a progress display could do the same). Spans nest (a step holds its phases, a phase
its passes and loads) and every start has its end, also when the span raises. A listener that raises stops
the run. Nothing is switched globally: listeners belong to the one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lowmem_sdpo.runtime.failures import OutOfMemory, is_cuda_oom, out_of_memory_message
from lowmem_sdpo.runtime.hardware import Hardware, peak_memory_bytes, reset_peak

# What a phase listener hears, by name (the measured phases are those of peak_memory_bytes_by_phase).
PHASE_EVENTS: dict[str, str] = {
    "step": "sDPO step t as a whole: tokenising D_t, its phases, its summary",
    "reference": "measured phase: M_{t-1}'s reference log-probs on D_t (loading S on the run's first step)",
    "train": "measured phase: a fresh LoRA put on M_{t-1} and trained on D_t",
    "save": "measured phase: P_t's pass over the drift sample (where measured), the adapter written",
    "load": "a model read and quantised to 4 bit (S, or S + adapters requantised)",
    "reference_pass": "M_{t-1}'s log-prob pass over D_t (absent when its cache is reused)",
    "base_pass": "S's log-prob pass over D_t (--diagnostics)",
    "drift_pass": "a pass over the drift sample: P_{t-1} in the reference phase, P_t in the save phase",
    "heldout_pass": "a pass over the held-out pairs: the reference's log-probs, then each evaluation",
}


@dataclass(frozen=True)
class PhaseEvent:
    name: str  # a key of PHASE_EVENTS
    step: int  # the sDPO step t, from 1
    edge: Literal["start", "end"]


PhaseListener = Callable[[PhaseEvent], None]


@dataclass
class PhaseEvents:
    """Sends PhaseEvents to the run's listeners; `step` is the step the run is in (set by in_step), so that a
    span opened deep in the engine (a model load) is told with its step."""

    listeners: Sequence[PhaseListener] = ()
    step: int = 0

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Tells the listeners `name` starts, then that it ended (also when the block raises). The engine's
        names are PHASE_EVENTS' keys (tests/unit/runtime/test_engine_phase_events.py holds it to them)."""
        self._send(name, "start")
        try:
            yield
        finally:
            self._send(name, "end")

    @contextlib.contextmanager
    def in_step(self, t: int) -> Iterator[None]:
        self.step = t
        with self.span("step"):
            yield

    def _send(self, name: str, edge: Literal["start", "end"]) -> None:
        for listener in self.listeners:
            listener(PhaseEvent(name, self.step, edge))


@dataclass
class PhasePeaks:
    hw: Hardware
    events: PhaseEvents = field(default_factory=PhaseEvents)
    peaks: dict[str, int] = field(default_factory=dict)  # phase -> bytes, in the order phases first ran

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measures the block's peak. Recorded also when the block raises: after an out-of-memory error the
        failing phase's figure is the one worth reporting. A phase run twice keeps the larger peak. Its events
        go out outside the measurement, so a listener's own work is not the phase's."""
        with self.events.span(name):
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
