"""Wall time, CPU time and peak memory of a worker's (possibly nested) phases, sampled every 5 ms."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def vm_hwm_bytes() -> int | None:
    """This process's own resident high-water mark (Linux VmHWM). Unlike ru_maxrss it starts from zero at exec,
    so it never inherits the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_self() -> int:
    import resource

    hwm = vm_hwm_bytes()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)



@dataclass
class PhaseRecord:
    phase: str
    step: int | None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of every thread of the process: less sensitive to a busy machine than wall
    peak_rss_bytes: int = 0
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_device_used_bytes: int | None = None  # the card's whole use (total - free): every context and process
    device_total_bytes: int | None = None
    started: float = 0.0
    cpu_started: float = 0.0
    hwm_at_start: int = 0


class PhaseClock:
    """Wall time and peak memory of (possibly nested) phases.

    A thread samples every 5 ms: the resident set on CPU. On CUDA it never resets the allocator's statistics
    (the engine resets them at its own phase boundaries and reads its per-phase peaks from them), so a phase's
    peak is the larger of what the samples saw allocated / reserved at that moment and every allocator
    high-water mark that rose, or restarted after a reset, between two samples of the phase: a value reached
    inside it. Each phase also gets the card's whole use, total - free from torch.cuda.mem_get_info (what
    `plan`'s allowance for the CUDA context and other processes is checked against), at its most.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.records: list[PhaseRecord] = []
        self.open: dict[tuple[str, int | None], PhaseRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._marks: tuple[int, int] | None = None  # the allocator's high-water marks at the last sample
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def _cuda_figures(self) -> tuple[int, int, int, int]:
        """(allocated, reserved, device used, device total) reached since the last sample: the marks that
        moved (rose, or restarted after the engine reset them) and the current figures."""
        import torch

        marks = (int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved()))
        now = (int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved()))
        last, self._marks = self._marks, marks
        moved = [m if last is not None and m != before else 0 for m, before in zip(marks, last or marks, strict=True)]
        free, total = torch.cuda.mem_get_info()
        return max(now[0], moved[0]), max(now[1], moved[1]), int(total - free), int(total)

    def _sample(self) -> None:
        with self._lock:
            if not self.open:
                self._marks = None
                return
            rss = rss_now()
            figures = self._cuda_figures() if self.cuda else None
            for rec in self.open.values():
                rec.peak_rss_bytes = max(rec.peak_rss_bytes, rss)
                if figures is not None:
                    alloc, reserved, used, total = figures
                    rec.peak_allocated_bytes = max(rec.peak_allocated_bytes or 0, alloc)
                    rec.peak_reserved_bytes = max(rec.peak_reserved_bytes or 0, reserved)
                    rec.peak_device_used_bytes = max(rec.peak_device_used_bytes or 0, used)
                    rec.device_total_bytes = total

    def _boundary(self) -> None:
        """Fold what happened since the last sample into the open phases (the statistics are left alone)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self._sample()
        if self.cuda:
            with self._lock:  # the marks as the next phase starts: only a later move counts for it
                import torch

                self._marks = (int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved()))

    def start(self, phase: str, step: int | None = None) -> None:
        self._boundary()
        with self._lock:
            rec = PhaseRecord(
                phase,
                step,
                started=time.perf_counter(),
                cpu_started=time.process_time(),
                hwm_at_start=peak_rss_self(),
            )
            rec.peak_rss_bytes = rss_now()
            self.open[(phase, step)] = rec

    def stop(self, phase: str, step: int | None = None) -> PhaseRecord | None:
        if (phase, step) not in self.open:
            return None
        self._boundary()
        with self._lock:
            rec = self.open.pop((phase, step))
            rec.wall_s = time.perf_counter() - rec.started
            rec.cpu_s = time.process_time() - rec.cpu_started
            hwm = peak_rss_self()
            if (
                hwm > rec.hwm_at_start
            ):  # the process's high-water mark rose during the phase: it is the phase's
                rec.peak_rss_bytes = max(rec.peak_rss_bytes, hwm)
            self.records.append(rec)
            return rec

    def is_open(self, phase: str, step: int | None = None) -> bool:
        return (phase, step) in self.open

    @contextlib.contextmanager
    def phase(self, phase: str, step: int | None = None) -> Iterator[None]:
        self.start(phase, step)
        try:
            yield
        finally:
            self.stop(phase, step)

    def close(self) -> None:
        for phase, step in list(self.open):
            self.stop(phase, step)
        self._stop.set()
        self._thread.join(timeout=1)

    def as_dicts(self) -> list[dict[str, Any]]:
        keep = (
            "phase",
            "step",
            "wall_s",
            "cpu_s",
            "peak_rss_bytes",
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "peak_device_used_bytes",
            "device_total_bytes",
        )
        return [{k: getattr(r, k) for k in keep} for r in self.records]
