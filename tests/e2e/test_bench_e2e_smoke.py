"""benchmarks/bench_e2e.py runs ours end to end on a minimal shape and writes the documented JSON; TRL systems
are skipped with a reason where trl is not installed (the CI venv), never silently dropped."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_e2e.py"
ROW_KEYS = {
    "system", "model", "seq_len", "phase", "peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes",
    "tokens_per_s", "wall_s",
}  # fmt: skip


def test_smoke_writes_schema(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    trl_missing = importlib.util.find_spec("trl") is None
    systems = ["ours", "trl"] if trl_missing else ["ours"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "smoke", "--systems", *systems,
         "--out", str(out), "--cache", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"device", "torch", "commit", "host", "latest_invocation", "invocations", "rows"} <= set(data)
    invocation = data["invocations"][data["latest_invocation"]]
    assert {"commit", "repeats", "systems", "loadavg_start", "loadavg_end", "host"} <= set(invocation)
    assert invocation["systems"] == systems and {r["invocation"] for r in data["rows"]} == {data["latest_invocation"]}
    assert data["device"].startswith("cpu")
    rows = data["rows"]
    for row in rows:
        assert ROW_KEYS <= set(row), row
    ours = {(r["phase"], r["step"]): r for r in rows if r["system"] == "ours"}
    for step in (1, 2):  # two sDPO steps, each with its reference pass and training
        for phase in ("reference", "train", "step"):
            row = ours[(phase, step)]
            assert row["status"] == "ok", row
            assert row["wall_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0
            assert row["peak_allocated_bytes"] is None  # CPU: RSS only
    assert ours[("total", None)]["tokens"] == ours[("step", 1)]["tokens"] + ours[("step", 2)]["tokens"]
    process = ours[("process", None)]
    assert process["tokens_match"] and process["optimizer_steps"] == [2, 2]
    assert abs(process["first_loss"][0] - 0.6931) < 1e-3  # a fresh LoRA: policy == reference
    if trl_missing:
        (trl,) = [r for r in rows if r["system"] == "trl"]
        assert trl["status"].startswith("skipped: trl is not installed") and trl["wall_s"] is None
