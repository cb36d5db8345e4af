"""benchmarks/bench_run.py runs a real (tiny) sDPO run and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_run.py"
ROW_KEYS = {
    "step", "pairs", "optimizer_steps", "tokens_per_second_median", "peak_memory_bytes", "memory_kind",
    "wall_seconds", "first_loss", "final_loss",
}  # fmt: skip


def test_smoke_run_writes_schema(tmp_path: Path) -> None:
    out = tmp_path / "bench_run.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"device", "torch", "transformers", "bitsandbytes", "commit", "model", "options", "rows"} <= set(
        data
    )
    assert data["model"] == "tiny" and data["options"]["batch_size"] == 8
    assert [r["step"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        # 300 toy pairs x 0.2 epoch = 60 units / (8 pairs x 2 micro-batches) = 3.75 -> 4 optimiser steps (enough
        # for a median that leaves out the first; the schema is the point, not the figures)
        assert row["pairs"] == 300 and row["optimizer_steps"] == 4
        assert row["tokens_per_second_median"] > 0 and row["peak_memory_bytes"] > 0
