"""What a finished step reports: summary.json's content and the table printed after the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_sdpo.engine.rundir.metrics import head_mean, tail_mean
from lowmem_sdpo.runtime.reporting import Reporter


def training_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's numbers that come from metrics.jsonl (one row per optimiser step)."""
    return {
        "optimizer_steps": len(rows),
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "reward_accuracy_first": head_mean(rows, "reward_accuracy"),
        "reward_accuracy_final": tail_mean(rows, "reward_accuracy"),
        "reward_margin_final": tail_mean(rows, "reward_margin"),
        "tokens_per_second": sum(r["tokens"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9),
    }


def print_step_summary(reporter: Reporter, s: dict[str, Any]) -> None:
    def f(v: Any, spec: str = ".4f") -> str:
        return "-" if v is None else format(v, spec)

    held = s.get("eval") or {}
    heldout_rows = [
        ("held-out pairs", str(held["pairs"])),
        ("held-out reward accuracy", f(held["reward_accuracy"], ".3f")),
        ("held-out reward margin", f(held["reward_margin"])),
        ("held-out gamma (policy / reference)", f"{f(held['gamma'])} / {f(held['gamma_ref'])}"),
    ] if held else []
    reporter.table(
        f"step {s['step']}: {Path(s['data']).name or s['data']}",
        [
            ("pairs used", str(s["pairs_used"])),
            ("optimiser steps", str(s["optimizer_steps"])),
            ("gamma_ref (mean)", f(s["gamma_ref_mean"])),
            ("gamma of S (mean)", f(s["gamma_base_mean"])),
            ("first loss", f(s["first_loss"])),
            ("final loss", f(s["final_loss"])),
            ("reward accuracy (last 10%)", f(s["reward_accuracy_final"], ".3f")),
            ("reward margin (last 10%)", f(s["reward_margin_final"])),
            ("tokens / s", f(s["tokens_per_second"], ".0f")),
            ("peak memory (GiB)", f(s["peak_memory_bytes"] / 2**30, ".2f")),
            ("wall (s)", f(s["wall_seconds"], ".1f")),
            *heldout_rows,
        ],
    )
