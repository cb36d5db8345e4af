"""Peak memory per phase of a step: on CPU the OS's cumulative max RSS, on CUDA the allocator's peak reset at
each phase boundary (tested here against a fake allocator whose peaks are worked out by hand)."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.peaks import PhasePeaks

CPU = Hardware(torch.device("cpu"), "float32")
MIB = 1 << 20


class _Boom(Exception):
    pass


def test_cpu_phases_in_order_positive_and_non_decreasing():
    peaks = PhasePeaks(CPU)
    kept = []
    for name in ("materialise", "reference", "train", "save"):
        with peaks.phase(name):
            kept.append(torch.ones(16 * MIB // 4))  # 16 MiB touched in each phase
    figures = peaks.as_dict()
    assert list(figures) == ["materialise", "reference", "train", "save"]
    values = list(figures.values())
    assert all(v > 16 * MIB for v in values)  # at least what the phase itself holds
    assert values == sorted(values)  # max RSS is never reset: cumulative
    assert peaks.overall() == values[-1]


def test_a_failing_phase_is_still_recorded_and_the_error_passes_through():
    peaks = PhasePeaks(CPU)
    with pytest.raises(_Boom), peaks.phase("reference"):
        raise _Boom
    assert list(peaks.as_dict()) == ["reference"] and peaks.as_dict()["reference"] > 0


class FakeAllocator:
    """torch.cuda's peak bookkeeping: current bytes, and a peak that reset_peak_memory_stats sets to current."""

    def __init__(self, current: int) -> None:
        self.current = self.peak = current
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def free(self, n: int) -> None:
        self.current -= n

    def reset_peak_memory_stats(self, device=None) -> None:
        assert torch.device(device).type == "cuda"
        self.resets += 1
        self.peak = self.current

    def max_memory_allocated(self, device=None) -> int:
        assert torch.device(device).type == "cuda"
        return self.peak


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeAllocator:
    fake = FakeAllocator(current=100)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    return fake


def test_cuda_phase_peaks_are_each_phases_own(fake_cuda):
    peaks = PhasePeaks(Hardware(torch.device("cuda", 0), "bfloat16"))
    with peaks.phase("materialise"):  # 100 -> 1100: the model stays
        fake_cuda.alloc(1000)
    with peaks.phase("reference"):  # a transient 300 on top of 1100
        fake_cuda.alloc(300)
        fake_cuda.free(300)
    fake_cuda.free(1000)  # the model released between phases: 100
    with peaks.phase("train"):  # a cumulative counter would still say 1400
        fake_cuda.alloc(50)
    with peaks.phase("reference"):  # run again lower: the higher figure is kept
        fake_cuda.alloc(10)
    assert peaks.as_dict() == {"materialise": 1100, "reference": 1400, "train": 150}
    assert peaks.overall() == 1400
    assert fake_cuda.resets == 4
