"""What every benchmark script shares: where results go, the commit that ran, atomic JSON, the device's name.

Imported by the scripts in benchmarks/ as a plain module (a script's own directory is first on sys.path). It
imports only the standard library and lowmem_sdpo's stdlib-only helpers (atomic writes, the host record), so a
script can still set its environment (TRITON_INTERPRET, ...) before torch, triton or the kernels load.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import atomic_path
from lowmem_sdpo.host import git_commit, host_record

__all__ = [
    "REPO",
    "RESULTS",
    "device_label",
    "git_commit",
    "host_record",
    "loadavg",
    "source_changes",
    "write_json_atomic",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def write_json_atomic(path: Path, data: Any, *, indent: int = 2) -> None:
    """`data` as JSON (keys in the order given: rows read as written), through a temp file and a rename, so a
    reader or a run cut at its time limit sees the old file or the new one, never half of one. The file gets
    the umask's permissions: mkstemp's 0600 is for secrets, not results a device run hands back."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def source_changes() -> list[str] | None:
    """Uncommitted changes to what the benchmarks run (the package and the kernels), as `git status` lists them:
    `commit` alone does not say what ran when the tree was dirty."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "lowmem_sdpo", "kernels"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (the machine may be shared), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_label(device: str) -> str:
    """The GPU's name, or the CPU's architecture and core count."""
    if device == "cuda":
        import torch  # here: a CPU-side script need not load torch for this module

        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
