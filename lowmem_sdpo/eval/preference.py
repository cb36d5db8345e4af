"""Preference accuracy and margins of a run's models on any preference data (`eval --data SPEC`).

For each M_t: DPO's implicit rewards beta * (log M_t - log reference) against --against (M_{t-1}, what step t
trained against, or S), with their accuracy, margin and means, and M_t's gamma (mean chosen-minus-rejected
log-ratio) and ranking accuracy (log M_t(chosen) > log M_t(rejected)). S's own gamma and ranking accuracy are
the baseline. Log-probs are cached under RUN/eval/logps/, keyed like the run's reference caches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import write_json
from lowmem_sdpo.data import StepData, load_steps, parse_columns, tokenize_step
from lowmem_sdpo.engine.config import reference_batch_size
from lowmem_sdpo.engine.reference.heldout import preference_figures
from lowmem_sdpo.engine.reference.logps import (
    LogpTable,
    adapter_chain_digest,
    cache_key,
    cached_logps,
    compute_logps,
)
from lowmem_sdpo.engine.rundir.keys import units_digest
from lowmem_sdpo.engine.units import Unit, build_units
from lowmem_sdpo.eval.runmodels import RunModels
from lowmem_sdpo.runtime.reporting import Reporter

# --against: which model step t's rewards are measured from.
AGAINST: dict[str, Any] = {
    "M_{t-1}": lambda t: t - 1,  # the reference step t trained against (M_0 = S)
    "S": lambda t: 0,
}


def slug(text: str) -> str:
    name = Path(text.split(" [")[0]).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem if "." in name else name).strip("_.") or "data"


class Scorer:
    """Log-probs of M_t on one data set's units, computed once per t and cached in the run directory."""

    def __init__(self, models: RunModels, data: StepData, units: list[Unit], reporter: Reporter) -> None:
        self.models, self.data, self.units, self.reporter = models, data, units, reporter
        self._tables: dict[int, LogpTable] = {}

    def _parts(self, t: int) -> dict[str, Any]:
        m, cfg = self.models, self.models.config
        return {
            "model": m.model_fp,
            "adapters": adapter_chain_digest(m.chains.get(t, [])),
            "quant": m.quant.to_dict(),
            "data": self.data.fingerprint(),
            "units": units_digest(self.units),
            "tokenization": {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length},
            "logprob_impl": m.impl,
            "device_type": m.hw.device.type,
        }

    def table(self, t: int) -> LogpTable:
        if t in self._tables:
            return self._tables[t]
        parts = self._parts(t)
        path = self.models.out / "logps" / f"{cache_key(parts)[:16]}.safetensors"
        table, _ = cached_logps(
            path,
            parts,
            lambda: compute_logps(
                self.models.model(t),
                self.units,
                pad_id=self.models.tokenizer.pad_token_id,
                batch_size=reference_batch_size(self.models.config),
                hw=self.models.hw,
                impl=self.models.impl,
                with_kl=False,
                reporter=self.reporter,
                description=f"eval: {'S' if t == 0 else f'M_{t}'} on {self.data.label}",
            ),
            need_kl=False,
        )
        self._tables[t] = table
        return table


def ranking_figures(table: LogpTable) -> dict[str, float]:
    """A model's own view of the pairs: gamma (mean chosen-minus-rejected log-ratio) and the share of pairs it
    ranks right (log p(chosen) > log p(rejected)); no reference involved."""
    ratios = table.chosen.double() - table.rejected.double()
    return {"gamma": float(ratios.mean()), "ranking_accuracy": float((ratios > 0).double().mean())}


def evaluate_preferences(
    models: RunModels, spec: str, steps: list[int], against: str, reporter: Reporter
) -> list[Path]:
    """One RUN/eval/preference-<data>.json per item of `spec`; returns their paths."""
    cfg = models.config
    written = []
    data_sets = load_steps(
        spec, columns=parse_columns(cfg.columns), seed=cfg.seed, desirable_threshold=cfg.desirable_threshold,
        flag="--data",
    )
    for data in data_sets:
        tokenized = tokenize_step(
            data, models.tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
        )
        units, kind = build_units(tokenized, seed=cfg.seed, label=data.label)
        scorer = Scorer(models, data, units, reporter)
        per_step = []
        for t in steps:
            ref = AGAINST[against](t)
            figures = preference_figures(scorer.table(t), scorer.table(ref), cfg.beta)
            ranking = ranking_figures(scorer.table(t))
            per_step.append({"step": t, "reference": "S" if ref == 0 else f"M_{ref}", **figures, **ranking})
        result = {
            "data": data.label,
            "source": data.source,
            "fingerprint": data.fingerprint(),
            "kind": kind,
            "units": len(units),
            "against": against,
            "beta": cfg.beta,
            "baseline_S": ranking_figures(scorer.table(0)),
            "steps": per_step,
        }
        path = models.out / f"preference-{slug(data.label)}.json"
        write_json(path, result)
        written.append(path)
        _print(reporter, result)
    return written


def _print(reporter: Reporter, result: dict[str, Any]) -> None:
    base = result["baseline_S"]
    rows = [("S: ranking accuracy / gamma", f"{base['ranking_accuracy']:.3f} / {base['gamma']:.4f}")]
    for s in result["steps"]:
        rows += [
            (f"M_{s['step']}: ranking accuracy / gamma", f"{s['ranking_accuracy']:.3f} / {s['gamma']:.4f}"),
            (
                f"M_{s['step']} vs {s['reference']}: reward accuracy / margin",
                f"{s['reward_accuracy']:.3f} / {s['reward_margin']:.4f}",
            ),
        ]
    reporter.table(f"eval: {result['data']} ({result['units']} units)", rows)
