"""Starting or resuming a run in its directory: the checks before anything loads (`check_run_dir`), and run.json
written for a new run or compared, difference by difference, for a resumed one (`prepare_run_dir`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import write_json
from lowmem_sdpo.engine.config import RunConfig, resume_differences
from lowmem_sdpo.engine.rundir.layout import RUN_FILE, read_run_file, versions
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.host import git_commit, host_record


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_run_dir(config: RunConfig, resume: bool) -> None:
    """The run directory's own input errors, found before any model or data is loaded and before anything is
    written: a file in its place, a parent we cannot create it in, --resume of a directory holding no run,
    a new run over a directory that holds one (or anything else)."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {out}: exists and is a file, not a directory")
    # The directory itself if it exists, else the ancestor it would be created in.
    base = _nearest_existing(out.absolute())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"--output-dir {out}: cannot write there ({base} is not a writable directory)")
    has_run = (out / RUN_FILE).is_file()
    if resume and not has_run:
        raise InputError(f"--resume {out}: no run there (no {RUN_FILE}); drop --resume to start one")
    if not resume and has_run:
        raise InputError(
            f"--output-dir {out}: already holds a run ({RUN_FILE}); pass --resume to continue it or choose another"
        )
    if not resume and out.is_dir() and any(out.iterdir()):
        raise InputError(f"--output-dir {out}: exists and is not empty (and holds no {RUN_FILE})")


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
    # run_sdpo has already checked (check_run_dir above) that there is a run to resume, or an
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
