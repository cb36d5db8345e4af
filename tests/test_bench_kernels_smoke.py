"""benchmarks/bench_kernels.py runs end to end in smoke mode and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
PEERS = {"ours-triton", "ours-torch", "naive-torch", "naive-torch-compile", "liger-flce", "liger-dpo", "apple-cce"}
ROW_KEYS = {
    "impl", "N", "D", "V", "dtype", "grad_weight", "ignored_frac", "ms_median", "peak_extra_bytes", "tflops", "status",
}


def test_smoke_run_writes_schema(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"device", "torch", "triton", "commit", "rows"} <= set(data)
    assert data["torch"] == torch.__version__ and isinstance(data["device"], str)
    rows = data["rows"]
    assert {r["impl"] for r in rows} == PEERS  # skipped peers are rows too, never dropped
    assert len(rows) == 2 * len(PEERS)  # two smoke cases: frozen/half-ignored and trainable/none-ignored
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["status"] == "ok" or row["status"].startswith(("skipped: ", "error: ")), row
        if row["status"] == "ok":
            assert row["ms_median"] > 0 and row["tflops"] > 0
            if data["device"].startswith("cpu"):
                assert row["peak_extra_bytes"] is None  # not measured on CPU
            else:
                assert row["peak_extra_bytes"] >= 0
        else:
            assert row["ms_median"] is None and row["tflops"] is None
    ours = [r for r in rows if r["impl"] in ("ours-triton", "ours-torch", "naive-torch")]
    assert all(r["status"] == "ok" for r in ours), ours
    # FLOP accounting on the first case (frozen weight, half of 64 rows ignored):
    # useful flops = 6 * 32 rows * D 32 * V 500 = 3,072,000.
    first = next(r for r in rows if r["impl"] == "ours-torch" and not r["grad_weight"])
    assert (first["N"], first["D"], first["V"], first["ignored_frac"]) == (64, 32, 500, 0.5)
    assert abs(first["tflops"] * 1e12 * first["ms_median"] * 1e-3 - 3_072_000) < 1.0
