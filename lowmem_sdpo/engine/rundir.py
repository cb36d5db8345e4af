"""The run directory: its file names, run.json (what made the run) and the --resume consistency check."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from lowmem_sdpo import __version__
from lowmem_sdpo.atomic import write_json
from lowmem_sdpo.engine.config import resume_differences
from lowmem_sdpo.errors import InputError

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
REFERENCE_CACHE = "reference_logps.safetensors"
BASE_CACHE = "base_logps.safetensors"


def step_dir(output_dir: Path, t: int) -> Path:
    return Path(output_dir) / f"step-{t}"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"lowmem_sdpo": __version__, "python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes", "datasets"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = "absent"
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def prepare_run_dir(session: Any, resume: bool) -> None:
    """Write run.json for a new run; for --resume, refuse when the configuration, data or model differ."""
    out = session.out
    run_file = out / RUN_FILE
    data = [
        {"step": t, "label": s.label, "source": s.source, "schema": s.schema, "fingerprint": s.fingerprint()}
        for t, s in enumerate(session.steps, start=1)
    ]
    if run_file.is_file():
        if not resume:
            raise InputError(
                f"{out} already holds a run ({RUN_FILE}); pass --resume to continue it or choose another --output-dir"
            )
        saved = json.loads(run_file.read_text())
        differ = resume_differences(saved.get("config", {}), session.config)
        if [d["fingerprint"] for d in saved.get("data", [])] != [d["fingerprint"] for d in data]:
            differ.append("data (the content of --steps)")
        if saved.get("model_fingerprint") != session.model_fp:
            differ.append("model (its files changed)")
        if differ:
            raise InputError(
                f"--resume {out}: this run was made with a different configuration: {', '.join(differ)}"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--output-dir {out}: exists and is not empty (and holds no {RUN_FILE})")
    write_json(
        run_file,
        {
            "config": session.config.to_dict(),
            "model_dir": str(session.model_dir),
            "model_fingerprint": session.model_fp,
            "device": str(session.hw.device),
            "compute_dtype": session.hw.compute_dtype,
            "logprob_impl": session.impl,
            "versions": versions(),
            "commit": git_commit(),
            "seed": session.config.seed,
            "data": data,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
