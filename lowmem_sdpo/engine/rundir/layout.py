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
from lowmem_sdpo.host import host_record, library_version

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


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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


# What a resumed run must share with the run it continues, beside the configuration: name -> how to read it
# from the session. A difference in any of them would silently change the numbers (or crash mid-step).
RESUME_CHECKS: dict[str, tuple[str, Any]] = {
    "model_fingerprint": ("model (its files changed)", lambda s: s.model_fp),
    "model_revision": ("model revision (hub commit)", lambda s: s.model_revision),
    "tokenizer_files": ("tokenizer files", lambda s: s.tokenizer_fp["files"]),
    "chat_template": ("chat template", lambda s: s.tokenizer_fp["chat_template"]),
    "device_type": ("device type", lambda s: s.hw.device.type),
    "compute_dtype": ("compute dtype", lambda s: s.hw.compute_dtype),
    "eval_data": ("held-out data (the content of --eval-steps)", lambda s: eval_fingerprints(s)),
}


def eval_fingerprints(session: Any) -> list[str | None] | None:
    """Each step's held-out data fingerprint; None for a run without held-out pairs (as run.json files
    written before held-out evaluation existed read)."""
    held = getattr(session, "heldout", None) or []
    return [h.fingerprint() if h is not None else None for h in held] if any(held) else None


def _resume_differences(
    saved: dict[str, Any], session: Any, data: list[dict[str, Any]], extend: bool = False
) -> list[str]:
    differ = resume_differences(saved.get("config", {}), session.config)
    if _effective_batch(saved.get("config", {}), saved) == _effective_batch(
        session.config.to_dict(), {"world_size": session.ranks.world}
    ):
        # Another split of the same effective batch (another rank count, micro-batch size or accumulation):
        # every optimiser step still sees the same units, only cut into other micro-batches.
        differ = [d for d in differ if d not in BATCH_SPLIT]
    was = [d["fingerprint"] for d in saved.get("data", [])]
    now = [d["fingerprint"] for d in data]
    if extend:
        # Steps may be appended (self-rewarding writes D_t after step t-1); the finished ones must not change.
        differ = [k for k in differ if k != "steps"]
        if now[: len(was)] != was:
            differ.append("data (the content of the steps already in the run)")
    elif was != now:
        differ.append("data (the content of --steps)")
    for key, (what, read) in RESUME_CHECKS.items():
        was, now = saved.get(key), read(session)
        if was != now:
            differ.append(f"{what}: {_short(was)} -> {_short(now)}")
    return differ


# The options that only split an optimiser step's units among micro-batches and ranks.
BATCH_SPLIT = ("batch_size", "grad_accum")


def _effective_batch(config: dict[str, Any], run: dict[str, Any]) -> int | None:
    """Units per optimiser step: batch_size x grad_accum x ranks (the run.json of a run from before
    data-parallel training holds no world_size: one process)."""
    if any(config.get(k) is None for k in BATCH_SPLIT):
        return None
    return int(config["batch_size"]) * int(config["grad_accum"]) * int(run.get("world_size", 1))


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text  # sha256 digests: a prefix names them well enough


def prepare_run_dir(session: Any, resume: bool, extend: bool = False) -> None:
    """Write run.json for a new run; for --resume, refuse when the configuration, data, model, tokenizer,
    chat template or resolved device settings differ, naming each difference. Every rank checks; rank 0
    alone writes. Another number of ranks (or micro-batch size, or accumulation) may resume a run when the
    effective batch, batch_size x grad_accum x ranks, stays the same: the schedule's optimiser steps are the
    seeded order cut into windows of that many units, whatever the split. With `extend`, a resumed run may
    gain steps after its own (run.json is then rewritten to list them)."""
    out = session.out
    data = [
        {"step": t, "label": s.label, "source": s.source, "schema": s.schema, "fingerprint": s.fingerprint()}
        for t, s in enumerate(session.steps, start=1)
    ]
    # run_sdpo has already checked (engine.config.check_run_dir) that there is a run to resume, or an
    # empty place for a new one.
    if resume:
        differ = _resume_differences(read_run_file(out) or {}, session, data, extend)
        if differ:
            raise InputError(
                f"--resume {out}: this run was made with a different configuration: {', '.join(differ)}"
            )
        saved = read_run_file(out) or {}
        if extend and session.ranks.is_main and len(data) > len(saved.get("data", [])):
            write_json(out / RUN_FILE, {**saved, "config": session.config.to_dict(), "data": data})
        return
    if not session.ranks.is_main:
        return
    write_json(
        out / RUN_FILE,
        {
            "config": session.config.to_dict(),
            "model_dir": str(session.model_dir),
            "model_fingerprint": session.model_fp,
            "model_revision": session.model_revision,
            "tokenizer_files": session.tokenizer_fp["files"],
            "chat_template": session.tokenizer_fp["chat_template"],
            "device": str(session.hw.device),
            "device_type": session.hw.device.type,
            "compute_dtype": session.hw.compute_dtype,
            "logprob_impl": session.impl,
            "versions": versions(),
            "host": host_record(),
            "commit": git_commit(),
            "seed": session.config.seed,
            # ranks of data-parallel training; effective batch = batch_size x grad_accum x world_size
            "world_size": session.ranks.world,
            "data": data,
            "eval_data": eval_fingerprints(session),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
