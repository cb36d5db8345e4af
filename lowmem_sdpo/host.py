"""What a run or benchmark ran on, as far as its numbers can depend on it.

Library versions and CPU features change numerics and speed on CPU: bitsandbytes' CPU kernels branch on
AVX512-BF16 (its inference repacking, which models/quant.py switches off), oneDNN and torch's CPU matmuls on
AVX-512 and AMX. run.json and every benchmark JSON carry `host_record()`, so a figure can be traced to its host.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from lowmem_sdpo.allocators import ALLOCATORS

# /proc/cpuinfo flags whose presence changes which CPU kernels bitsandbytes and torch run.
NUMERIC_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")
PROC_MAPS = Path("/proc/self/maps")


def _cpuinfo_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and which of NUMERIC_CPU_FLAGS it has (None each where /proc/cpuinfo is absent)."""
    if cpuinfo is None:
        cpuinfo = CPUINFO.read_text() if CPUINFO.is_file() else ""
    flags = set((_cpuinfo_field(cpuinfo, "flags") or "").split())
    known = bool(flags)
    return {
        "cpu_model": _cpuinfo_field(cpuinfo, "model name") or platform.processor() or None,
        "cpu_flags": {flag: (flag in flags) if known else None for flag in NUMERIC_CPU_FLAGS},
    }


def cpu_allocator(maps: str | None = None) -> str:
    """The malloc this process's CPU tensors come from: "tcmalloc" / "jemalloc" when one is mapped in (it
    replaces malloc only when preloaded; runtime/cpu_allocator.py starts runs so), else the C library's own:
    "glibc", or "system" (musl, macOS). It decides a CPU run's peak RSS and part of its CPU time."""
    if maps is None:
        maps = PROC_MAPS.read_text() if PROC_MAPS.is_file() else ""
    files = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    for name, allocator in ALLOCATORS.items():
        if any(allocator.is_file(f) for f in files):
            return name
    return "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def library_version(dist: str) -> str:
    """An installed distribution's version, or "absent"."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def host_record() -> dict[str, Any]:
    """Machine, cores, CPU features, torch's CPU dispatch level and the numerics-relevant library versions."""
    import torch

    return {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        **cpu_features(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "libraries": {d: library_version(d) for d in ("torch", "triton", "transformers", "peft", "bitsandbytes")},
        # models/quant.py keeps every Linear4bit off bitsandbytes' AVX512-BF16 repacking, on every host.
        "bitsandbytes_cpu_repacking": "off",
        "cpu_allocator": cpu_allocator(),
    }


def git_commit() -> str | None:
    """The commit of the lowmem_sdpo source that is running: LOWMEM_SDPO_COMMIT when set (gpu_pass.sh passes the
    CPU side's, since the device copy may have no .git), else git's HEAD of the checkout holding this package,
    else None (an installed wheel, or no git)."""
    if os.environ.get("LOWMEM_SDPO_COMMIT"):
        return os.environ["LOWMEM_SDPO_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
