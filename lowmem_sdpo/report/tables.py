"""The report's tables: the per-step summary (every number read from summary.json) and the run's settings
(from run.json). One registry of rows, so report.md and report.html show the same numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 2**20


@dataclass(frozen=True)
class Field:
    label: str
    key: str  # dotted path into summary.json, e.g. "eval.reward_accuracy"
    scale: float = 1.0  # shown value = value / scale (bytes as MiB)


SUMMARY_FIELDS: tuple[Field, ...] = (
    Field("pairs used", "pairs_used"),
    Field("optimiser steps", "optimizer_steps"),
    Field("gamma of the reference M_{t-1} on D_t", "gamma_ref_mean"),
    Field("gamma of S on D_t", "gamma_base_mean"),
    Field("first loss", "first_loss"),
    Field("final loss", "final_loss"),
    Field("reward accuracy, first 10% of optimiser steps", "reward_accuracy_first"),
    Field("reward accuracy, last 10%", "reward_accuracy_final"),
    Field("reward margin, last 10%", "reward_margin_final"),
    Field("held-out pairs", "eval.pairs"),
    Field("held-out reward accuracy", "eval.reward_accuracy"),
    Field("held-out reward margin", "eval.reward_margin"),
    Field("held-out rewards, chosen", "eval.rewards_chosen"),
    Field("held-out rewards, rejected", "eval.rewards_rejected"),
    Field("held-out gamma of the policy", "eval.gamma"),
    Field("held-out gamma of the reference", "eval.gamma_ref"),
    Field("reference drift (nats)", "reference_drift"),
    Field("training shift (nats)", "training_shift"),
    Field("training tokens / s", "tokens_per_second"),
    Field("peak memory (MiB)", "peak_memory_bytes", MIB),
    Field("wall time (s)", "wall_seconds"),
)

SETTINGS: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("steps", "steps"),
    ("loss", "loss"),
    ("beta", "beta"),
    ("learning rate", "learning_rate"),
    ("epochs", "epochs"),
    ("reference mode", "reference"),
    ("target init", "target_init"),
    ("seed", "seed"),
)


def lookup(summary: dict[str, Any], key: str) -> Any:
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def number(value: Any, scale: float = 1.0) -> str:
    """Six significant digits; '-' for a figure the step does not have."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) and scale == 1.0:
        return str(value)
    return format(value / scale, ".6g")


Table = tuple[list[str], list[list[str]]]  # header, rows


def summary_table(summaries: list[dict[str, Any]]) -> Table:
    header = ["", *(f"step {s['step']}" for s in summaries)]
    rows = []
    for field in SUMMARY_FIELDS:
        values = [lookup(s, field.key) for s in summaries]
        if all(v is None for v in values):
            continue  # e.g. no held-out pairs in this run
        rows.append([field.label, *(number(v, field.scale) for v in values)])
    return header, rows


def settings_table(run: dict[str, Any]) -> Table:
    config = run.get("config", {})
    rows = [[label, number(config.get(key))] for label, key in SETTINGS]
    rows.append(["device", str(run.get("device", "-"))])
    return ["setting", "value"], rows
