"""benchmarks/bench_kernels.py runs end to end in smoke mode and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
PEERS = {
    "ours-triton", "ours-torch", "naive-torch", "naive-torch-compile", "liger-flce", "liger-flce-sum", "liger-dpo",
    "apple-cce",
}
ROW_KEYS = {
    "impl", "N", "D", "V", "dtype", "grad_weight", "ignored_frac", "logits", "ms_median", "peak_extra_bytes", "tflops",
    "floor_ms", "vs_floor", "vs_cce", "vs_liger", "vs_liger_sum", "mem_vs_cce", "mem_vs_liger", "mem_vs_liger_sum",
    "status",
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
    # The floor: the same useful FLOPs at the matmul rate the run measured; vs_floor = ms / floor_ms.
    rate = data["matmul_tflops"]["float32"]
    assert rate > 0 and abs(first["floor_ms"] - 3_072_000 / (rate * 1e12) * 1e3) < 1e-9
    assert abs(first["vs_floor"] - first["ms_median"] / first["floor_ms"]) < 1e-9
    # Ratios to CCE / Liger exist only where those ran (CUDA); the second case has LM-like logits.
    assert all(r["vs_cce"] is None and r["vs_liger"] is None for r in rows if data["device"].startswith("cpu"))
    assert [r["logits"] for r in rows if r["impl"] == "ours-torch"] == ["normal", "lm"]
    # Filter skip shares, once per input set: fractions of tiles. fp32 has no "auto" filter (eps null, 0 skipped).
    skips = data["filter_skip"]
    assert [(s["logits"], s["ignored_frac"]) for s in skips] == [("normal", 0.5), ("lm", 0.0)]
    for s in skips:
        assert s["eps_bound"] is None and s["eps_element"] is None
        assert s["bound_dh"] == s["bound_dw"] == s["element"] == 0.0


def test_variants_are_reachable_and_run() -> None:
    # Every --variants name is a choice of the parser and runs: one timed step each on a tiny case, in this
    # process (the subprocess above already covers the script's own loop and JSON).
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_kernels", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.parse_args(["--variants", *bench.VARIANTS]).variants == list(bench.VARIANTS)
    args = argparse.Namespace(runs=1, warmup=0, autotune=False, matmul_tflops={})
    case = bench.Case(40, 16, 200, torch.float32, grad_weight=True, ignored_frac=0.5, logits="lm")
    for name in bench.VARIANTS:
        row = bench.run_one(name, case, "cpu", args)
        assert row["status"] == "ok" and row["ms_median"] > 0, row
