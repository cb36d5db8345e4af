"""`lowmem-sdpo plan`, the command: its phase table, its JSON (parts adding up to the totals), its advice when
the card is too small, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lowmem_sdpo.cli import main
from lowmem_sdpo.plan import PHASES, PlanSettings, plan_for_shapes
from lowmem_sdpo.plan.phases import CUDA_CONTEXT_BYTES, FRAGMENTATION
from tests.support.plan_cases import FIXTURES, GIB, SOLAR, shapes_of


def test_plan_command_prints_the_phase_table():
    out = subprocess.run(
        [sys.executable, "-m", "lowmem_sdpo", "plan", "--model", SOLAR, "--max-length", "2048"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for key in PHASES:
        assert key in out
    assert "NF4 block weights" in out and "checkpointed layer inputs" in out
    assert "500 MiB CUDA context" in out  # the stated assumption


def _plan_json(capsys, *args: str) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_parts_add_up_to_the_totals(capsys):
    data = _plan_json(capsys, "--model", SOLAR, "--max-length", "2048", "--batch-size", "1")
    assert [p["phase"] for p in data["phases"]] == list(PHASES)
    for phase in data["phases"]:
        assert sum(part["bytes"] for part in phase["parts"]) == phase["allocated_bytes"]
        expected = math.ceil(phase["allocated_bytes"] * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES
        assert phase["device_bytes"] == (expected if phase["allocated_bytes"] else 0)
    peak = max(data["phases"], key=lambda p: p["allocated_bytes"])
    assert data["peak"] == {
        "phase": peak["phase"],
        "allocated_bytes": peak["allocated_bytes"],
        "device_bytes": peak["device_bytes"],
    }
    assert data["fits"] == (peak["device_bytes"] <= 24 * GIB)
    export = data["phases"][-1]
    assert export["phase"] == "export" and export["allocated_bytes"] == 0


def test_advice_appears_when_the_card_is_too_small_and_each_suggestion_fits(capsys):
    data = _plan_json(
        capsys, "--model", SOLAR, "--max-length", "4096", "--batch-size", "4", "--gpu-memory", "12GiB"
    )
    assert not data["fits"] and data["advice"]
    shapes = shapes_of(SOLAR, "bfloat16")
    base = {"max_length": 4096, "batch_size": 4, "lora_r": 16, "grad_accum": 4}
    for suggestion in data["advice"]:
        assert suggestion["device_bytes"] <= 12 * GIB
        values = dict(base)
        values |= {flag[2:].replace("-", "_"): value for flag, value in suggestion["flags"].items()}
        replanned = plan_for_shapes("solar", SOLAR, shapes, PlanSettings(**values), gpu_memory=12 * GIB)
        assert replanned.fits and replanned.peak.device == suggestion["device_bytes"]
        if "--batch-size" in suggestion["flags"]:  # the pairs per optimiser step are kept
            assert values["batch_size"] * values["grad_accum"] >= 16
    assert (
        main(["plan", "--model", SOLAR, "--max-length", "4096", "--batch-size", "4", "--gpu-memory", "12GiB"])
        == 0
    )
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "these fit:" in text and data["advice"][0]["args"] in text


@pytest.mark.parametrize("value", ["lots", "24", "-3GiB", "0GiB", "24 parsecs"])
def test_bad_gpu_memory_is_one_line_and_exit_2(capsys, value):
    assert main(["plan", "--model", SOLAR, "--max-length", "2048", f"--gpu-memory={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-memory") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--steps", "12859,lots"], "--steps"),
        (["--tflops", "0"], "--tflops"),
        (["--batch-size", "0"], "--batch-size"),
        (["--model", str(FIXTURES / "no-such-model")], "model"),
        (["--model", "solar-10.7b-sft"], "model"),
    ],
)
def test_other_bad_input_is_one_line_and_exit_2(capsys, args, flag):
    argv = ["plan", "--model", SOLAR, "--max-length", "2048", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and err.count("\n") == 1
