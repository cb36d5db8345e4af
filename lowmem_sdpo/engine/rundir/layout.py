"""The run directory's layout: its file names, step directories, and reading run.json (what made the run).
Writing it and the --resume consistency check are in resume.py."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from lowmem_sdpo import __version__
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.host import library_version

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
REFERENCE_CACHE = "reference_logps.safetensors"
BASE_CACHE = "base_logps.safetensors"
EVAL_REFERENCE_CACHE = "eval_reference_logps.safetensors"  # M_{t-1} on step t's held-out pairs


def step_dir(output_dir: Path, t: int) -> Path:
    return Path(output_dir) / f"step-{t}"


def versions() -> dict[str, str]:
    found = {"lowmem_sdpo": __version__, "python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes", "datasets"):
        found[dist] = library_version(dist)
    return found


def read_run_file(output_dir: Path) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err}); the run directory is damaged") from err


def pinned_revision(output_dir: Path) -> str | None:
    """The hub commit a run's model resolved to when it started (None: a local directory, or no run)."""
    saved = read_run_file(output_dir)
    return saved.get("model_revision") if saved else None
