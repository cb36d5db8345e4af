"""benchmarks/bench_sdpo_real.py in smoke mode (the `tiny` model, a few verifiable-instruction prompts, one
seed): every arm is trained and scored, the JSON holds what the README's table is made from, and S's held-out
figures are what the code judge gives the JSON's own saved greedy answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from lowmem_sdpo.verifiable.judge import score, strict

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sdpo_real.py"
ARMS = ("S", "sdpo", "sdpo_off", "dpo")


def test_smoke_run_scores_every_arm_from_its_saved_answers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and data["seeds"] == [0] and set(data["arms"]) == set(ARMS)
    assert data["chosen"] in [g["settings"] for g in data["grid"]]
    assert all(set(g["validation"]) >= {"S", "sdpo", "sdpo_off", "dpo", "mean_trained"} for g in data["grid"])
    assert data["host"]["bitsandbytes_cpu_repacking"] == "off" and data["wall_seconds"] > 0

    prompts = [row["prompt"] for row in data["prompts"]["heldout"]]
    assert len(prompts) == data["sizes"]["heldout"]
    gens = data["generations"]["heldout"]
    # Re-scored here, independently of the run, from the saved greedy answers.
    s_strict = sum(strict(p, a) for p, a in zip(prompts, gens["S"], strict=True)) / len(prompts)
    s_sat = sum(score(p, a) or 0.0 for p, a in zip(prompts, gens["S"], strict=True)) / len(prompts)
    assert data["arms"]["S"]["mean"]["strict"] == s_strict
    assert math.isclose(data["arms"]["S"]["mean"]["satisfaction"], s_sat)
    for arm in ARMS[1:]:
        row = data["arms"][arm]["per_seed"][0]
        answers = gens[arm]["0"]
        assert row["strict"] == sum(strict(p, a) for p, a in zip(prompts, answers, strict=True)) / len(prompts)
    # The same pairs per step and batch: one optimiser-step count for every trained arm, sDPO in two steps.
    rows = {arm: data["arms"][arm]["per_seed"][0] for arm in ARMS[1:]}
    assert len({r["optimizer_steps"] for r in rows.values()}) == 1 and rows["dpo"]["optimizer_steps"] > 0
    assert len(rows["sdpo"]["first_losses"]) == 2 and len(rows["dpo"]["first_losses"]) == 1
    # A fresh LoRA starts at its reference: every first step's loss is log 2.
    assert abs(rows["dpo"]["first_losses"][0] - math.log(2)) < 1e-3
    record = data["seed_records"][0]
    assert rows["dpo"]["optimizer_steps"] * data["train"]["batch_size"] == record["pairs"]["d1"] + record["pairs"]["d2"]
    for arm in ("sdpo", "sdpo_off"):
        g = record["gamma"][arm]
        assert math.isclose(g["gamma_ref"], g["gamma_M1"] - g["gamma_S"]) and math.isfinite(g["gamma_ref"])
