"""`self-reward` killed with SIGKILL in each phase (generating, judging, training) and resumed each time
gives the very rows, pairs and adapter of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowmem_sdpo.cli import main

REPO = Path(__file__).resolve().parents[2]
N_PROMPTS, N_CANDIDATES = 4, 2


def _args(prompts: Path, out: Path) -> list[str]:
    return [
        "self-reward", "--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out),
        "--iterations", "1", "--candidates", str(N_CANDIDATES), "--judge", "python:tests.support.slow_judge:judge",
        "--judge-samples", "1", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "5",
        "--gen-batch-size", "1", "--max-length", "32", "--max-prompt-length", "24", "--learning-rate", "1e-3",
        "--epochs", "6", "--batch-size", "1", "--grad-accum", "1", "--save-every", "1", "--lora-r", "4",
        "--lora-alpha", "8", "--lora-dropout", "0", "--device", "cpu", "--no-gradient-checkpointing", "--quiet",
    ]  # fmt: skip


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 240) -> None:
    # The inherited PYTHONPATH carries tests/bnb_host (conftest), so the child runs under the same simulated host.
    path = [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_sdpo", *args], env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_each_phase_resumes_after_sigkill_with_identical_rows(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a + 1}="}) + "\n" for a in range(N_PROMPTS)))
    monkeypatch.syspath_prepend(str(REPO))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(_args(prompts, ref)) == 0

    it = killed / "iter-1"
    _kill_when(_args(prompts, killed), lambda: _lines(it / "candidates.jsonl") >= 1)
    assert _lines(it / "candidates.jsonl") < N_PROMPTS and not (it / "judgements.jsonl").exists()
    resume = [*_args(prompts, killed), "--resume"]
    _kill_when(resume, lambda: _lines(it / "judgements.jsonl") >= 2)
    assert _lines(it / "judgements.jsonl") < N_PROMPTS * N_CANDIDATES
    metrics = killed / "sdpo" / "step-1" / "metrics.jsonl"
    _kill_when(resume, lambda: _lines(metrics) >= 1)
    assert not (killed / "sdpo" / "step-1" / "summary.json").exists()
    assert main(resume) == 0

    for name in ("candidates.jsonl", "judgements.jsonl", "pairs.jsonl"):
        assert (it / name).read_text() == (ref / "iter-1" / name).read_text(), name
    adapter = "sdpo/step-1/adapter/adapter_model.safetensors"
    got, want = load_file(str(killed / adapter)), load_file(str(ref / adapter))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    summary = json.loads((it / "summary.json").read_text())
    assert summary == json.loads((ref / "iter-1" / "summary.json").read_text())
    assert summary["candidates"] == N_PROMPTS * N_CANDIDATES and summary["pairs"] >= 1
