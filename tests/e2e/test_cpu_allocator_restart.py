"""`lowmem-sdpo run --cpu-allocator`: the command-line process restarts itself under tcmalloc and run.json says
what the run ran on; glibc keeps the process; main() called from Python never replaces its caller.

The restart needs tcmalloc installed (Debian's libtcmalloc-minimal4); where it is not, those cases skip and the
refusal of a named but missing allocator is checked instead."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_sdpo.cli.allocator import restart_if_asked
from lowmem_sdpo.runtime.cpu_allocator import find_allocator

REPO = Path(__file__).resolve().parents[2]
TCMALLOC = find_allocator("tcmalloc")
GLIBC = platform.libc_ver()[0] == "glibc"


def _run(tmp_path: Path, allocator: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "lowmem_sdpo", "run", "--model", "tiny",
        "--steps", str(REPO / "examples" / "data" / "toy_step1.jsonl"), "--output-dir", str(tmp_path / "run"),
        "--max-length", "32", "--max-prompt-length", "24", "--batch-size", "16", "--epochs", "0.25",
        "--lora-r", "4", "--device", "cpu", "--quiet", "--cpu-allocator", allocator,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _host(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "run.json").read_text())["host"]


@pytest.mark.skipif(TCMALLOC is None or not GLIBC, reason="needs tcmalloc installed (libtcmalloc-minimal4) and glibc")
def test_the_command_restarts_under_tcmalloc_and_records_it(tmp_path):
    proc = _run(tmp_path, "auto")  # what a user gets without the flag
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _host(tmp_path)["cpu_allocator"] == "tcmalloc"
    summary = json.loads((tmp_path / "run" / "step-1" / "summary.json").read_text())
    assert summary["optimizer_steps"] > 0


@pytest.mark.skipif(not GLIBC, reason="glibc builds of Python only")
def test_glibc_keeps_the_process_on_glibc(tmp_path):
    proc = _run(tmp_path, "glibc")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _host(tmp_path)["cpu_allocator"] == "glibc"


@pytest.mark.skipif(TCMALLOC is not None, reason="tcmalloc is installed here: the restart cases check it")
def test_a_named_allocator_that_is_missing_is_refused_in_one_line(tmp_path):
    proc = _run(tmp_path, "tcmalloc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "--cpu-allocator tcmalloc: no libtcmalloc_minimal" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_only_the_command_line_process_restarts():
    """main() from Python (own_process False) and CUDA runs return at once: no exec, whatever is installed."""
    args = argparse.Namespace(cpu_allocator="tcmalloc", own_process=False, argv=["run"], debug=False)
    assert restart_if_asked(args, "cpu") is None
    args.own_process = True
    assert restart_if_asked(args, "cuda") is None
