"""benchmarks/bench_sdpo_vs_dpo.py in smoke mode (the `tiny` model, a few carry-toy pairs, one seed): every arm
trains through the engine and is scored, and the JSON holds what the README's table is made from; plus the
demo's reading of that JSON (a claim only when sDPO led in every seed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from lowmem_sdpo.cli.demo_cmd import heldout_comparison

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sdpo_vs_dpo.py"
ARMS = ("S", "sdpo", "dpo", "sdpo_base")


def test_smoke_run_writes_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--split", "validation", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and data["split"] == "validation" and data["seeds"] == [0]
    assert data["data"] == {"step1_pairs": 32, "step2_pairs": 32, "scored_pairs": 24}
    assert set(data["arms"]) == set(ARMS)
    rows = {arm: data["arms"][arm]["per_seed"][0] for arm in ARMS}
    for arm, row in rows.items():
        for metric in ("preference_accuracy", "exact_match"):
            assert 0 <= row[metric] <= 1 and row[metric] * 24 == round(row[metric] * 24), (arm, metric)
        assert math.isfinite(row["gamma"])
    assert rows["S"]["reward_accuracy"] is None and rows["S"]["optimizer_steps"] == 0
    # Same data, passes and batch size: the same number of optimiser steps for every trained arm
    # (64 pairs x 1 epoch / 8 per step = 8; each sDPO step 4).
    assert {rows[a]["optimizer_steps"] for a in ARMS[1:]} == {8}
    assert len(rows["dpo"]["first_losses"]) == 1 and len(rows["sdpo"]["first_losses"]) == 2
    # A fresh LoRA starts at its reference: the first loss is log 2 wherever the policy's base is the reference.
    for loss in (
        rows["sdpo"]["first_losses"] + rows["dpo"]["first_losses"] + rows["sdpo_base"]["first_losses"][:1]
    ):
        assert abs(loss - math.log(2)) < 1e-3
    for arm in ARMS[1:]:
        assert 0 <= rows[arm]["reward_accuracy"] <= 1
    # Trained arms moved the model: their gamma on the scored pairs is not S's.
    assert all(rows[a]["gamma"] != rows["S"]["gamma"] for a in ARMS[1:])
    assert data["differences"]["sdpo - dpo"]["preference_accuracy"]["seeds"] == 1


def _result(path: Path, sdpo: list[float], dpo: list[float]) -> Path:
    def arm(values: list[float]) -> dict:
        return {
            "mean": {"preference_accuracy": sum(values) / len(values)},
            "sd": {"preference_accuracy": 0.01},
        }

    deltas = [a - b for a, b in zip(sdpo, dpo, strict=True)]
    data = {
        "split": "heldout",
        "model": "tiny-carry",
        "arms": {"S": arm([0.6]), "sdpo": arm(sdpo), "dpo": arm(dpo), "sdpo_base": arm(sdpo)},
        "differences": {
            "sdpo - dpo": {
                "preference_accuracy": {
                    "mean": sum(deltas) / len(deltas),
                    "sd": 0.01,
                    "a_ahead_in": sum(d > 0 for d in deltas),
                    "seeds": len(deltas),
                }
            }
        },
    }
    path.write_text(json.dumps(data))
    return path


def test_demo_claims_sdpo_over_dpo_only_when_every_seed_shows_it(tmp_path: Path) -> None:
    rows, claims = heldout_comparison(_result(tmp_path / "a.json", [0.8, 0.81, 0.79], [0.7, 0.72, 0.75]))
    assert (
        len(rows) == 5 and ("benchmark: sDPO ahead of DPO in", "3 of 3 seeds (heldout, tiny-carry)") in rows
    )
    assert len(claims) == 1 and claims[0][1]
    rows, claims = heldout_comparison(_result(tmp_path / "b.json", [0.8, 0.7, 0.79], [0.7, 0.72, 0.75]))
    assert len(rows) == 5 and claims == []  # the numbers, no claim
    assert heldout_comparison(tmp_path / "missing.json") == ([], [])
