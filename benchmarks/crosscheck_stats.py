"""The comparisons benchmarks/crosscheck_trl.py reports: differences, noise-based tolerances, token alignment.

Pure functions of lists and dicts (the LoRA comparison of tensors), no TRL: tests/unit/benchmarks/test_crosscheck_stats.py runs
them in CI, where TRL is not installed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

NOISE_FACTOR = 10.0  # a tolerance is this many times the ours-vs-ours fp32 reduction-order noise
FP32_EPS = 2.0**-23
# Per optimiser step, in both sides' metrics rows (ours' names; TRL logs them as TRL_KEYS).
STEP_FIGURES = ("loss", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected")
TRL_KEYS = {
    "loss": "loss",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}

Rows = list[dict[str, float]]
Tokens = Sequence[tuple[list[int], list[int], list[int]]]  # (prompt, chosen, rejected) ids per pair


def delta_stats(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """max and mean of |a - b|, elementwise over two equally long, non-empty sequences."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty sequences of one length, got {len(a)} and {len(b)}")
    d = [abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)]
    return {"max": max(d), "mean": sum(d) / len(d)}


def tolerance(noise_max: float, scale: float) -> float:
    """NOISE_FACTOR x the measured noise, and never below 4 fp32 ulps of the values' scale: two runs can agree
    exactly on a figure (the first step's loss is ln 2 on both), which says nothing about the next."""
    return max(NOISE_FACTOR * noise_max, 4 * FP32_EPS * scale)


def verdict(delta: float, tol: float) -> dict[str, Any]:
    return {"max_abs_diff": delta, "tolerance": tol, "ok": delta <= tol}


def per_step(rows: Rows, figure: str) -> list[float]:
    return [float(r[figure]) for r in rows]


def steps_compared(a: Rows, b: Rows) -> dict[str, Any]:
    """Per figure: |a - b| at every optimiser step, and their max and mean."""
    out: dict[str, Any] = {}
    for f in STEP_FIGURES:
        x, y = per_step(a, f), per_step(b, f)
        out[f] = {"per_step_abs": [abs(p - q) for p, q in zip(x, y, strict=True)], **delta_stats(x, y)}
    return out


def step_checks(ours: Rows, trl: Rows, noise: Rows) -> dict[str, dict[str, Any]]:
    """Each figure's largest per-step |ours - TRL| against NOISE_FACTOR x its largest |ours - ours'|."""
    out = {}
    for f in STEP_FIGURES:
        scale = max(abs(v) for v in per_step(trl, f))
        noise_max = delta_stats(per_step(ours, f), per_step(noise, f))["max"]
        out[f"{f}_per_step"] = verdict(
            delta_stats(per_step(ours, f), per_step(trl, f))["max"], tolerance(noise_max, scale)
        )
    return out


def lora_compared(a: dict[str, Any], b: dict[str, Any], init: dict[str, Any]) -> dict[str, float]:
    """Largest |a - b| over every LoRA tensor beside the largest update training made (|a - init|), and the
    Frobenius norm of a - b over all tensors relative to that of a - init. Adam's first steps move every entry
    by about the learning rate whatever its gradient's size, so an entry whose gradient is all rounding noise
    may move either way: the largest difference can be as large as the update itself between two runs that
    differ only in rounding."""
    diff = max(float((a[n].double() - b[n].double()).abs().max()) for n in init)
    moved = max(float((a[n].double() - init[n].double()).abs().max()) for n in init)
    fro_diff = math.sqrt(sum(float((a[n].double() - b[n].double()).square().sum()) for n in init))
    fro_moved = math.sqrt(sum(float((a[n].double() - init[n].double()).square().sum()) for n in init))
    return {
        "max_abs_diff": diff,
        "max_abs_update": moved,
        "relative_max": diff / moved if moved else math.nan,
        "relative_frobenius": fro_diff / fro_moved if fro_moved else math.nan,
    }


def tokens_compared(ours: Tokens, trl: Tokens, decode: Callable[[list[int]], str]) -> dict[str, Any]:
    """How TRL's ids differ from ours: equal prompts, and what TRL's answers carry past the end of ours'
    (decoded text -> how many answers)."""
    tails: dict[str, int] = {}
    for o, t in zip(ours, trl, strict=True):
        for mine, theirs in ((o[1], t[1]), (o[2], t[2])):
            key = (
                json.dumps(decode(theirs[len(mine) :]))
                if theirs[: len(mine)] == mine
                else "(not an extension)"
            )
            tails[key] = tails.get(key, 0) + 1
    return {
        "pairs": len(ours),
        "prompts_equal": sum(o[0] == t[0] for o, t in zip(ours, trl, strict=True)),
        "trl_answer_tail_after_ours": tails,
    }


def lora_check(aligned: dict[str, float], noise: dict[str, float]) -> dict[str, Any]:
    """The trained adapters, ours against TRL's, as the Frobenius norm of their difference relative to how far
    training moved them, against NOISE_FACTOR x the same figure for ours against ours. Not the largest single
    entry: in Adam's first steps an entry whose gradient is rounding noise moves by about lr either way, so the
    largest-entry difference is as big as the update itself and such a check could not fail."""
    got, tol = aligned["relative_frobenius"], NOISE_FACTOR * noise["relative_frobenius"]
    return {"relative_frobenius": got, "tolerance": tol, "ok": got <= tol}
