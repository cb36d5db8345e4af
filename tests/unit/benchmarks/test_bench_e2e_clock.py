"""bench_e2e.py's phase clock on CUDA, against a fake allocator: it never resets the allocator's statistics (the
engine resets them at its own phase boundaries and reads its per-phase peaks from them), yet each phase gets its
own peak, a reset by the engine inside a phase included, and the card's whole use from mem_get_info."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_e2e.py"
GiB = 2**30


def _bench_e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e_clock_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class FakeAllocator:
    """torch.cuda's memory statistics as the caching allocator keeps them: current and peak allocated / reserved,
    peaks reset only by reset_peak_memory_stats (which the engine calls, and the clock must not)."""

    def __init__(self, total: int = 80 * GiB, context: int = GiB // 2) -> None:
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.total, self.context = total, context
        self.engine_resets = 0

    def set(self, allocated: int) -> None:
        self.allocated = allocated
        self.reserved = max(self.reserved, allocated)
        self.peak_allocated = max(self.peak_allocated, allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def engine_reset(self) -> None:  # what runtime.peaks.PhasePeaks does at the start of each of its phases
        self.engine_resets += 1
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda *a, **k: self.allocated)
        monkeypatch.setattr(cuda, "memory_reserved", lambda *a, **k: self.reserved)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a, **k: self.peak_allocated)
        monkeypatch.setattr(cuda, "max_memory_reserved", lambda *a, **k: self.peak_reserved)
        monkeypatch.setattr(cuda, "mem_get_info", lambda *a, **k: (self.total - self.context - self.reserved,
                                                                   self.total))

        def no_reset(*a, **k):
            raise AssertionError("the clock reset the allocator's peak statistics")

        monkeypatch.setattr(cuda, "reset_peak_memory_stats", no_reset)


@pytest.fixture
def clock_and_allocator(monkeypatch):
    fake = FakeAllocator()
    fake.install(monkeypatch)
    clock = _bench_e2e().PhaseClock(cuda=True)
    clock._stop.set()  # no sampling thread: the test takes the samples itself, between events
    clock._thread.join(timeout=1)
    yield clock, fake
    clock.close()


def test_each_phase_gets_its_own_peak_without_resetting_the_engines(clock_and_allocator):
    clock, fake = clock_and_allocator
    fake.set(2 * GiB)  # the model, loaded before any phase
    clock.start("step", 1)
    clock.start("reference", 1)
    fake.engine_reset()
    fake.set(10 * GiB)  # a spike between two samples: no sample sees it, the high-water mark does
    fake.set(2 * GiB)
    clock._sample()
    fake.engine_reset()  # the engine's next phase starts inside ours
    fake.set(6 * GiB)
    fake.set(3 * GiB)
    clock._sample()
    clock.stop("reference", 1)
    clock.start("train", 1)
    fake.set(4 * GiB)  # the high-water mark stays at 6 GiB, reached before this phase: not this phase's
    clock._sample()
    assert clock.open[("train", 1)].peak_allocated_bytes == 4 * GiB
    fake.engine_reset()  # a reset, then a spike under the old mark: the restarted mark is this phase's
    fake.set(5 * GiB)
    fake.set(2 * GiB)
    clock.stop("train", 1)
    clock.stop("step", 1)
    rows = {(r["phase"], r["step"]): r for r in clock.as_dicts()}
    assert rows[("reference", 1)]["peak_allocated_bytes"] == 10 * GiB
    assert rows[("train", 1)]["peak_allocated_bytes"] == 5 * GiB
    assert rows[("step", 1)]["peak_allocated_bytes"] == 10 * GiB
    # The engine's own statistics were left alone: its last phase's peak is still there to read.
    assert fake.peak_allocated == 5 * GiB and fake.engine_resets == 3
    # The card's whole use: what the allocator reserved plus the context and everything else on the card.
    assert rows[("reference", 1)]["peak_device_used_bytes"] == 10 * GiB + GiB // 2
    assert rows[("train", 1)]["device_total_bytes"] == 80 * GiB
    assert rows[("reference", 1)]["peak_reserved_bytes"] == 10 * GiB
