"""What a report reads from a run directory: run.json, each finished step's summary.json and metrics.jsonl,
and the per-pair log-ratios of the cached reference passes (the paper's Figure 2 needs them pair by pair)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.engine.rundir.layout import BASE_CACHE, REFERENCE_CACHE, RUN_FILE, read_run_file, step_dir
from lowmem_sdpo.engine.rundir.metrics import METRICS_FILE, read_summary
from lowmem_sdpo.errors import InputError


@dataclass
class StepRecord:
    t: int
    summary: dict[str, Any]
    rows: list[dict[str, Any]]  # metrics.jsonl, one per optimiser step
    # per-pair log pi(chosen) - log pi(rejected) on D_t: of S, and of the reference M_{t-1} (None if not cached)
    ratios_s: torch.Tensor | None = None
    ratios_ref: torch.Tensor | None = None


@dataclass
class RunData:
    run_dir: Path
    run: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def summaries(self) -> list[dict[str, Any]]:
        return [s.summary for s in self.steps]


def _ratios(path: Path) -> torch.Tensor | None:
    """chosen - rejected of a cached log-prob table (a file the run wrote), or None when it is not there."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    table = load_file(str(path))
    return table["chosen"].double() - table["rejected"].double()


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise InputError(f"{path}: line {number} is not valid JSON ({err})") from err
    return rows


def read_run(run_dir: Path) -> RunData:
    """The finished steps of a run (a step is finished when its summary.json exists)."""
    run_dir = Path(run_dir)
    run = read_run_file(run_dir)
    if run is None:
        raise InputError(f"{run_dir}: no {RUN_FILE} (not a lowmem-sdpo run directory)")
    data = RunData(run_dir, run)
    for t in range(1, len(run.get("data", [])) + 1):
        sdir = step_dir(run_dir, t)
        try:
            summary = read_summary(sdir)
        except ValueError as err:
            raise InputError(f"{sdir / 'summary.json'}: not valid JSON ({err})") from err
        if summary is None:
            break
        reference = _ratios(sdir / REFERENCE_CACHE)
        # M_0 is S: step 1's reference pass is S's; later steps have S's only with --diagnostics.
        base = reference if t == 1 else _ratios(sdir / BASE_CACHE)
        data.steps.append(StepRecord(t, summary, _rows(sdir / METRICS_FILE), base, reference if t > 1 else None))
    if not data.steps:
        raise InputError(f"{run_dir}: no finished step yet (no step-1/summary.json)")
    return data
