"""A finished run's models, as the run had them: Q(S) loaded once in 4 bit, and M_t = Q(S) + the adapters of
steps 1..t as a frozen low-rank delta (runtime/materialise.py's exact holder: swapping t swaps hooks only).
A run trained in requantized mode is evaluated the same way: M_t exactly as trained, not requantised."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from lowmem_sdpo.data import load_tokenizer
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.rundir.layout import RUN_FILE, read_run_file, step_dir
from lowmem_sdpo.engine.rundir.metrics import read_summary
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import QuantSettings, model_fingerprint, resolve_model
from lowmem_sdpo.models.adapters import WEIGHTS_FILE
from lowmem_sdpo.runtime.hardware import Hardware, resolve_hardware, resolve_logprob_impl
from lowmem_sdpo.runtime.materialise import Holder
from lowmem_sdpo.runtime.open_model import open_model
from lowmem_sdpo.runtime.reporting import Reporter

EVAL_DIR = "eval"  # RUN/eval/*.json


@dataclass
class RunModels:
    run_dir: Path
    config: RunConfig
    model_dir: Path
    model_fp: str
    hw: Hardware
    impl: str
    quant: QuantSettings
    tokenizer: Any
    chains: dict[int, list[Path]]  # finished step t -> the adapters making M_t
    holder: Holder  # exact

    @property
    def finished(self) -> list[int]:
        return sorted(self.chains)

    def model(self, t: int) -> nn.Module:
        """M_t (t = 0: S) in 4 bit, eval mode."""
        return self.holder.model_for(self.chains.get(t, []))

    def steps(self, step: int | None) -> list[int]:
        """--step t, or every finished step."""
        if step is None:
            return self.finished
        if step not in self.chains:
            raise InputError(
                f"--step {step}: not a finished step of {self.run_dir} "
                f"(finished: {', '.join(map(str, self.finished)) or 'none'})"
            )
        return [step]

    @property
    def out(self) -> Path:
        return self.run_dir / EVAL_DIR

    def close(self) -> None:
        self.holder.release()


def finished_chains(run_dir: Path, run: dict[str, Any] | None = None) -> dict[int, list[Path]]:
    """Finished step t -> the adapters making M_t (from step-t/summary.json), for the steps in a row from 1 that
    have finished. `run` is the run's run.json when the caller has read it already."""
    run = run if run is not None else (read_run_file(run_dir) or {})
    chains: dict[int, list[Path]] = {}
    for t in range(1, len(run.get("data", [])) + 1):
        summary = read_summary(step_dir(run_dir, t))
        if summary is None:
            break
        chains[t] = [run_dir / c for c in summary["adapter_chain"]]
    return chains


def open_run(run_dir: Path, reporter: Reporter) -> RunModels:
    run_dir = Path(run_dir)
    run = read_run_file(run_dir)
    if run is None:
        raise InputError(f"--run {run_dir}: no {RUN_FILE} (not a lowmem-sdpo run directory)")
    known = {f.name for f in fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in run.get("config", {}).items() if k in known})
    chains = finished_chains(run_dir, run)
    if not chains:
        raise InputError(f"--run {run_dir}: no finished step yet (no step-1/summary.json)")
    for t, chain in chains.items():  # before any model loads: a deleted adapter is one line, not a traceback
        for adapter in chain:
            if not (adapter / WEIGHTS_FILE).is_file():
                raise InputError(f"--run {run_dir}: M_{t} needs {adapter / WEIGHTS_FILE}, which is missing")
    model_dir = Path(run.get("model_dir", ""))
    if not (model_dir / "config.json").is_file():  # the run was moved to another machine: resolve again
        model_dir = resolve_model(config.model, run.get("model_revision"))
    hw = resolve_hardware(config)
    impl = resolve_logprob_impl(hw, config.logprob_impl, source=f"{run_dir / RUN_FILE}: logprob_impl")
    # exact whatever the run's reference mode: M_t as trained, not requantised
    model = open_model(model_dir, hw, double_quant=config.double_quant, reporter=reporter)
    return RunModels(
        run_dir=run_dir,
        config=config,
        model_dir=model_dir,
        model_fp=model_fingerprint(model_dir),
        hw=hw,
        impl=impl,
        quant=model.quant,
        tokenizer=load_tokenizer(str(model_dir)),
        chains=chains,
        holder=model.holder,
    )

