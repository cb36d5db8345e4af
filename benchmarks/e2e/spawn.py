"""Starting worker processes: one per system and run, so that a process's peak memory is that system's alone."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, write_json_atomic

SCRIPT = REPO / "benchmarks" / "bench_e2e.py"  # the entry point, which runs a worker under --worker


def trl_missing(python: str) -> str | None:
    """Why TRL systems cannot run under `python`, or None. Asked of that interpreter, not imported here."""
    code = "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('trl') else 3)"
    if python == sys.executable:
        return None if importlib.util.find_spec("trl") else f"trl is not installed in {python}"
    proc = subprocess.run([python, "-c", code], capture_output=True, timeout=60)
    return None if proc.returncode == 0 else f"trl is not installed in {python}"


def spawn(
    python: str,
    system: str,
    spec: dict[str, Any],
    work: Path,
    timeout: float,
    profile: str | None,
    extra_env: dict[str, str] | None = None,
) -> tuple[dict[str, Any] | None, str, dict[str, Any]]:
    """Runs one worker process (`extra_env` on top of this one's: the allocator's LD_PRELOAD); -> (its result
    or None, the tail of its output, process figures)."""
    tag = f"{system}-{time.time_ns()}"
    spec_path, result_path, log_path = (
        work / f"{tag}.spec.json",
        work / f"{tag}.result.json",
        work / f"{tag}.log",
    )
    spec = {**spec, "system": system, "tmp": str(work / tag)}
    Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec_path, spec)
    cmd = [python, str(SCRIPT), "--worker", system, "--spec", str(spec_path)]
    cmd += ["--result", str(result_path)] + (["--profile", profile] if profile else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH")])
        ),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / tag / "hf_datasets"),
        "TRANSFORMERS_VERBOSITY": "error",
        "WANDB_DISABLED": "true",
        **(extra_env or {}),
    }
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        figures: dict[str, Any] = {}
        try:
            deadline = started + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    figures["wait4_maxrss_bytes"] = int(usage.ru_maxrss) * (
                        1 if sys.platform == "darwin" else 1024
                    )
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    proc.wait()
                    figures["timed_out"] = True
                    break
                time.sleep(0.1)
        except BaseException:
            proc.kill()
            raise
    figures["process_wall_s"] = time.perf_counter() - started
    figures["returncode"] = proc.returncode
    tail = log_path.read_text(errors="replace")[-3000:]
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    shutil.rmtree(work / tag, ignore_errors=True)
    return result, tail, figures
