"""The per-step table both demos print (`demo` on the tiny model, `demo --real` on SmolLM2): its own module so
that the two demo commands share it without importing each other."""

from __future__ import annotations

from typing import Any


def step_rows(summaries: list[dict[str, Any]], *, margin: bool) -> list[tuple[str, str]]:
    """The demos' per-step table rows: gamma_ref, gamma of S, first loss, final reward accuracy (and margin)."""
    rows = []
    for s in summaries:
        rows += [
            (f"step {s['step']} gamma_ref", f"{s['gamma_ref_mean']:.3f}"),
            (f"step {s['step']} gamma of S", f"{s['gamma_base_mean']:.3f}"),
            (f"step {s['step']} first loss", f"{s['first_loss']:.4f}"),
            (f"step {s['step']} reward accuracy (last 10%)", f"{s['reward_accuracy_final']:.3f}"),
        ]
        if margin:
            rows.append((f"step {s['step']} reward margin (last 10%)", f"{s['reward_margin_final']:.3f}"))
    return rows
