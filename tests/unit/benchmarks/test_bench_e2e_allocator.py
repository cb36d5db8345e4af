"""bench_e2e.py's workers start on the malloc `lowmem-sdpo run --cpu-allocator` would choose (ours and TRL's
alike): the environment the driver hands them, against runtime/cpu_allocator.py's own plan."""

from __future__ import annotations

import sys
from pathlib import Path

from lowmem_sdpo.host import cpu_allocator
from lowmem_sdpo.runtime.cpu_allocator import STARTED_FOR, find_allocator

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _driver():
    sys.path.insert(0, str(BENCHMARKS))  # bench_e2e's package (e2e.*) and its helpers (common) resolve beside it
    from e2e.driver import allocator_env

    return allocator_env


def test_workers_get_the_preload_run_would_choose():
    allocator_env = _driver()
    assert allocator_env("auto", "cuda") == {} and allocator_env("tcmalloc", "cuda") == {}
    assert allocator_env("glibc", "cpu") == {}
    if cpu_allocator() == "glibc" and find_allocator("tcmalloc"):
        env = allocator_env("auto", "cpu")
        assert env["LD_PRELOAD"].split()[0] == find_allocator("tcmalloc") and env[STARTED_FOR] == "tcmalloc"
    else:  # no tcmalloc here (or this process already runs on another malloc): the workers inherit this one's
        assert allocator_env("auto", "cpu") == {}
