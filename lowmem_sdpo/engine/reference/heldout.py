"""Held-out evaluation during a run: preference figures of the current policy on pairs it never trained on.

The pairs come from `--eval-split F` (a seeded fraction of each D_t, kept out of training) or `--eval-steps
SPEC` (the --steps grammar: one item for every step, or one per step). At the end of each step, and every
`--eval-every N` optimiser steps, the policy's log-probs on them (no grad, no dropout) are compared with the
reference's, which are computed once per step and cached like the training ones. The figures join that
optimiser step's metrics.jsonl row under `eval/...` (one line per optimiser step stays one line, so resume
keeps cutting the log by line count) and the last of them go into summary.json's "eval".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowmem_sdpo.data import StepData, load_steps, parse_columns
from lowmem_sdpo.data.heldout import split_heldout
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.reference.logps import LogpTable
from lowmem_sdpo.engine.units import Unit
from lowmem_sdpo.errors import InputError

PREFIX = "eval/"


def heldout_data(config: RunConfig, steps: list[StepData]) -> tuple[list[StepData], list[StepData | None]]:
    """(the steps to train on, each step's held-out data or None)."""
    if config.eval_split:
        parts = [split_heldout(step, config.eval_split, config.seed, t) for t, step in enumerate(steps, start=1)]
        return [train for train, _ in parts], [held for _, held in parts]
    if not config.eval_steps:
        return steps, [None] * len(steps)
    held = load_steps(
        config.eval_steps,
        columns=parse_columns(config.columns),
        seed=config.seed,
        desirable_threshold=config.desirable_threshold,
        flag="--eval-steps",
    )
    if len(held) == 1:
        return steps, held * len(steps)
    if len(held) != len(steps):
        raise InputError(
            f"--eval-steps '{config.eval_steps}': {len(held)} items for {len(steps)} steps; "
            "give one item for every step or one per step"
        )
    return steps, list(held)


def preference_figures(policy: LogpTable, reference: LogpTable, beta: float) -> dict[str, float]:
    """DPO's implicit rewards beta * (log pi - log pi_ref) of each answer, and their summary figures; gamma is
    the policy's own mean chosen-minus-rejected log-ratio (the sDPO paper's gamma, of the current model)."""
    pc, pr = policy.chosen.double(), policy.rejected.double()
    chosen = beta * (pc - reference.chosen.double())
    rejected = beta * (pr - reference.rejected.double())
    return {
        "reward_accuracy": float((chosen > rejected).double().mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "rewards_chosen": float(chosen.mean()),
        "rewards_rejected": float(rejected.mean()),
        "gamma": float((pc - pr).mean()),
    }


Scorer = Callable[[nn.Module, list[Unit]], LogpTable]  # no-grad log-probs of a model on units


@dataclass
class HeldOut:
    """Step t's held-out units with M_{t-1}'s cached log-probs on them."""

    units: list[Unit]
    reference: LogpTable
    beta: float
    score: Scorer

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """The `eval/...` fields of a metrics row for the policy `model` as it is now."""
        figures = preference_figures(self.score(model, self.units), self.reference, self.beta)
        return {PREFIX + "pairs": len(self.units)} | {PREFIX + k: v for k, v in figures.items()}


def heldout_summary(rows: list[dict[str, Any]], reference: LogpTable | None) -> dict[str, Any] | None:
    """summary.json's "eval": the last evaluation of the step (of the final policy) and the reference's gamma."""
    last = next((r for r in reversed(rows) if PREFIX + "pairs" in r), None)
    if last is None or reference is None:
        return None
    figures = {k.removeprefix(PREFIX): v for k, v in last.items() if k.startswith(PREFIX)}
    return figures | {"gamma_ref": reference.gamma_mean(), "opt_step": last["opt_step"]}


def due(done: int, total: int, every: int) -> bool:
    """Whether optimiser step `done` (1-based) of `total` ends with a held-out evaluation."""
    return done == total or (every > 0 and done % every == 0)
