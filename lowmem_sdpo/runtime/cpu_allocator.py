"""Which malloc a CPU run's process uses, and the environment that starts it on a better one than glibc's.

torch's CPU tensors come from malloc. glibc's keeps freed activations in a heap that fragments (4.1 GiB RSS for
297 MiB of live tensors in a SmolLM2-135M step: runtime/cpu_heap.py), and bounding it (cpu_heap's fixed mmap
threshold) makes every large tensor a fresh, zeroed mapping: 8 million page faults and a third more CPU per
step. tcmalloc keeps freed blocks by size and reuses them: on that step it matched glibc's speed (16.8 CPU-s
against 17.6, 0.02 M faults) at the bound's RSS (1,128 MiB against 1,086); jemalloc (default decay) still faulted
4.5 M times for 21.6 CPU-s (benchmarks/ab_cpu_heap.py, results/ab_cpu_heap_allocators.json). So `--cpu-allocator
auto` takes tcmalloc when the system has it, and glibc with the bound otherwise.

An allocator replaces malloc only if it is loaded before anything allocates, i.e. named in LD_PRELOAD when the
process starts: the CLI re-executes its own command line with it (cli/allocator.py). Loading one later, with
dlopen, would hand blocks of one allocator to the other's free. This module only finds libraries and builds the
environment; it never loads one.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lowmem_sdpo.allocators import ALLOCATORS
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.host import cpu_allocator

AUTO_ORDER = ("tcmalloc",)  # jemalloc is offered by name only: measured slower than tcmalloc (module docstring)
CHOICES = ("auto", "glibc", *ALLOCATORS)
# Set in the environment of the re-executed process: which allocator it was started for, so that it never
# re-executes again (even where the preload silently failed).
STARTED_FOR = "LOWMEM_SDPO_CPU_ALLOCATOR"

Finder = Callable[[str], str | None]


def find_allocator(name: str, find: Finder = ctypes.util.find_library) -> str | None:
    """The library to preload for `name` (a soname the dynamic loader finds), or None if not installed."""
    for library in ALLOCATORS[name].libraries:
        found = find(library)
        if found:
            return found
    return None


@dataclass(frozen=True)
class AllocatorPlan:
    allocator: str  # what the run will use
    preload: str | None  # the library to restart with; None: run in this process as it is


def plan_allocator(
    choice: str,
    *,
    active: str | None = None,
    environ: Mapping[str, str] | None = None,
    find: Finder = ctypes.util.find_library,
) -> AllocatorPlan:
    """What `--cpu-allocator CHOICE` means for this process. `active` (default: this process's) and `environ`
    (default os.environ) are parameters for the tests. A named allocator that is missing, or whose preload did
    not take, is bad input; `auto` never fails: it falls back to the allocator already running."""
    if choice not in CHOICES:
        raise InputError(f"--cpu-allocator: expected one of {', '.join(CHOICES)}, got {choice!r}")
    active = cpu_allocator() if active is None else active
    environ = os.environ if environ is None else environ
    started_for = environ.get(STARTED_FOR)
    if choice == "glibc" or choice == active:
        return AllocatorPlan(active, None)  # a preload the user set up is left alone
    if choice == "auto":
        if active != "glibc" or started_for:  # already preloaded by the user, or a restart that did not take
            return AllocatorPlan(active, None)
        for name in AUTO_ORDER:
            library = find_allocator(name, find)
            if library:
                return AllocatorPlan(name, library)
        return AllocatorPlan(active, None)
    if started_for == choice:
        raise InputError(
            f"--cpu-allocator {choice}: the process was restarted with it in LD_PRELOAD but runs on {active}; "
            "check the library loads (`ldd` on it), or pass --cpu-allocator glibc"
        )
    library = find_allocator(choice, find)
    if library is None:
        raise InputError(
            f"--cpu-allocator {choice}: no {' or '.join('lib' + n for n in ALLOCATORS[choice].libraries)} on this "
            f"system ({ALLOCATORS[choice].install}), or pass --cpu-allocator auto"
        )
    return AllocatorPlan(choice, library)


def preload_environment(plan: AllocatorPlan, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the plan's library first in LD_PRELOAD (what was there stays after it), the allocator's
    settings where `environ` has none, and the marker."""
    if plan.preload is None:
        raise ValueError("the plan keeps this process: nothing to preload")
    env = {**dict(ALLOCATORS[plan.allocator].environ), **environ}  # the user's own settings win
    env["LD_PRELOAD"] = " ".join(p for p in (plan.preload, environ.get("LD_PRELOAD", "")) if p)
    env[STARTED_FOR] = plan.allocator
    return env
