"""benchmarks/crosscheck_stats.py (the TRL cross-check's comparisons) on hand-worked values, and
crosscheck_trl.py's command line, which answers --help and refuses bad settings without TRL installed."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


def _stats():
    spec = importlib.util.spec_from_file_location(
        "crosscheck_stats_under_test", BENCH / "crosscheck_stats.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cs = _stats()


def test_delta_stats_by_hand():
    assert cs.delta_stats([1.0, 2.0, 3.0], [1.5, 2.0, 1.0]) == {"max": 2.0, "mean": 2.5 / 3}
    with pytest.raises(ValueError, match="one length"):
        cs.delta_stats([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        cs.delta_stats([], [])


def test_tolerance_is_noise_times_factor_with_an_ulp_floor():
    assert cs.tolerance(1e-6, 1.0) == pytest.approx(1e-6 * cs.NOISE_FACTOR)
    # noise measured as exactly 0: 4 fp32 ulps of the values' scale (scale 2 -> 4 * 2 * 2^-23 = 2^-20)
    assert cs.tolerance(0.0, 2.0) == 2.0**-20


def row(loss: float, rc: float = 0.0) -> dict[str, float]:
    return {
        "loss": loss,
        "rewards_chosen": rc,
        "rewards_rejected": -rc,
        "logps_chosen": -10.0,
        "logps_rejected": -12.0,
    }


def test_step_checks_against_the_noise_floor():
    ln2 = math.log(2)
    ours = [row(ln2), row(0.60, 0.05)]
    noise = [row(ln2), row(0.60 + 1e-7, 0.05)]  # ours' reduction-order noise: 1e-7 on step 2's loss
    near = [row(ln2), row(0.60 + 5e-7, 0.05)]  # within 10x
    far = [row(ln2), row(0.60 + 5e-6, 0.05)]  # 50x
    assert cs.step_checks(ours, near, noise)["loss_per_step"]["ok"]
    bad = cs.step_checks(ours, far, noise)["loss_per_step"]
    assert not bad["ok"] and bad["max_abs_diff"] == pytest.approx(5e-6)
    # equal figures (the rewards here) pass at the ulp floor
    assert cs.step_checks(ours, far, noise)["rewards_chosen_per_step"]["ok"]
    delta = cs.steps_compared(ours, far)["loss"]
    assert delta["per_step_abs"] == pytest.approx([0.0, 5e-6]) and delta["mean"] == pytest.approx(2.5e-6)


def test_lora_compared():
    init = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    ours = {"a": torch.tensor([[0.0, 0.5], [0.0, 0.0]]), "b": torch.ones(3)}
    other = {"a": torch.tensor([[0.0, 0.5], [0.0, 0.001]]), "b": torch.tensor([1.0, 1.0, 1.25])}
    got = cs.lora_compared(ours, other, init)
    assert got["max_abs_diff"] == 0.25 and got["max_abs_update"] == 0.5 and got["relative_max"] == 0.5
    # sqrt(0.001^2 + 0.25^2) / 0.5
    assert got["relative_frobenius"] == pytest.approx(math.sqrt(0.001**2 + 0.25**2) / 0.5)


def test_tokens_compared_names_trls_extra_tail():
    decode = lambda ids: "".join(chr(96 + i) for i in ids)  # noqa: E731 - 1 -> "a", 2 -> "b", ...
    ours = [([1, 2], [3, 4], [5]), ([1, 2], [6], [7])]
    trl = [([1, 2], [3, 4, 9], [5, 9]), ([1, 3], [6, 9], [8, 9])]
    got = cs.tokens_compared(ours, trl, decode)
    assert got == {
        "pairs": 2,
        "prompts_equal": 1,
        "trl_answer_tail_after_ours": {'"i"': 3, "(not an extension)": 1},
    }


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "crosscheck_trl.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_cli_help_and_bad_settings_need_no_trl():
    done = run_script("--help")
    assert done.returncode == 0 and "--pairs" in done.stdout and "--learning-rate" in done.stdout
    bad = run_script("--pairs", "10", "--batch", "2", "--accum", "2")
    assert bad.returncode == 2 and "multiple of --batch x --accum" in bad.stderr


def test_lora_check_is_relative_to_the_update_and_catches_bf16_adapters():
    noise = {"relative_frobenius": 0.002, "max_abs_diff": 1.3e-4}
    # 10 x 0.002 = 0.02: an aligned run at 5e-4 passes, TRL's bf16 adapters (a third of the update off) fail.
    assert cs.lora_check({"relative_frobenius": 5e-4, "max_abs_diff": 6e-5}, noise) == {
        "relative_frobenius": 5e-4, "tolerance": 0.02, "ok": True,
    }  # fmt: skip
    assert not cs.lora_check({"relative_frobenius": 0.316, "max_abs_diff": 3e-4}, noise)["ok"]
