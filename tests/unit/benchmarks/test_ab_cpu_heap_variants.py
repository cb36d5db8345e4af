"""ab_cpu_heap.py's allocator variants preload the library `run --cpu-allocator` would find, never a fixed path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lowmem_sdpo.allocators import ALLOCATORS
from lowmem_sdpo.runtime import cpu_allocator

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _ab():
    sys.path.insert(0, str(BENCHMARKS))  # its helpers (common) resolve beside it
    import ab_cpu_heap

    return ab_cpu_heap


def test_allocator_variants_preload_what_find_allocator_finds(monkeypatch):
    ab = _ab()
    preloading = {name: v for name, v in ab.VARIANTS.items() if v.preload is not None}
    assert {v.preload for v in preloading.values()} == set(ALLOCATORS)
    monkeypatch.setattr(cpu_allocator, "find_allocator", lambda name: f"/opt/{name}/lib{name}.so")
    for name, variant in preloading.items():
        env = ab.variant_env(variant)
        assert env["LD_PRELOAD"] == f"/opt/{variant.preload}/lib{variant.preload}.so", name
        assert {k: v for k, v in env.items() if k != "LD_PRELOAD"} == variant.env
    assert ab.variant_env(ab.VARIANTS["mmap-128k"]) == {}
    assert "LD_PRELOAD" not in ab.child_env(ab.VARIANTS["glibc"])


def test_a_missing_allocator_is_one_line_with_its_install_hint(monkeypatch):
    ab = _ab()
    monkeypatch.setattr(cpu_allocator, "find_allocator", lambda name: None)
    with pytest.raises(SystemExit, match=r"variant tcmalloc: .*apt install libtcmalloc-minimal4"):
        ab.variant_env(ab.VARIANTS["tcmalloc"])
