"""`lowmem-sdpo run`: the sDPO pipeline over steps t = 1..T (M_0 = S, the model given).

Per step: materialise M_{t-1} (by default Q(S), loaded once per run, plus the finished steps' adapters as a
frozen low-rank delta: runtime/materialise.py), compute or reuse the cached reference log-probs of D_t, put a
fresh LoRA on M_{t-1} (or on S with --target-init base), train, save the adapter and summary. runs/NAME/
holds run.json and step-t/ directories; a step is done when its summary.json exists.

Under a launcher (`accelerate launch`, torchrun) every rank runs this same pipeline data-parallel
(runtime/distributed.py): the reference pass and training are shared out, rank 0 alone writes files, and all
ranks wait at the end of each step until rank 0 has written its adapter and summary.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.atomic import atomic_dir, write_json
from lowmem_sdpo.data import StepData, TokenizedStep, load_steps, load_tokenizer, parse_columns, tokenize_step
from lowmem_sdpo.engine.config import DRIFT_SAMPLE, RunConfig, reference_batch_size
from lowmem_sdpo.engine.reference.heldout import HeldOut, heldout_data, heldout_summary
from lowmem_sdpo.engine.reference.logps import LogpTable, adapter_chain_digest, cached_logps, compute_logps
from lowmem_sdpo.engine.rundir.keys import hub_commit, tokenizer_fingerprint, units_digest
from lowmem_sdpo.engine.rundir.layout import (
    ADAPTER_DIR,
    BASE_CACHE,
    EVAL_REFERENCE_CACHE,
    REFERENCE_CACHE,
    pinned_revision,
    step_dir,
)
from lowmem_sdpo.engine.rundir.metrics import SUMMARY_FILE, read_summary
from lowmem_sdpo.engine.rundir.resume import check_run_dir, prepare_run_dir
from lowmem_sdpo.engine.training.deterministic import training_impl
from lowmem_sdpo.engine.training.loop import StepCallback
from lowmem_sdpo.engine.training.objective import Objective
from lowmem_sdpo.engine.training.schedule import build_schedule
from lowmem_sdpo.engine.training.summary import print_step_summary, training_figures
from lowmem_sdpo.engine.training.trainer import StepJob, train_step
from lowmem_sdpo.engine.units import Unit, build_units
from lowmem_sdpo.models import QuantSettings, add_lora, model_fingerprint, resolve_model
from lowmem_sdpo.models.lora import enable_checkpointing
from lowmem_sdpo.runtime.distributed import Ranks, process_group
from lowmem_sdpo.runtime.hardware import (
    Hardware,
    resolve_hardware,
)
from lowmem_sdpo.runtime.materialise import Holder, release_memory, unwrap_policy
from lowmem_sdpo.runtime.open_model import open_model
from lowmem_sdpo.runtime.peaks import PhaseEvents, PhaseListener, PhasePeaks, out_of_memory_reported
from lowmem_sdpo.runtime.reporting import Reporter
from lowmem_sdpo.trackers import check_tracker, open_tracker


@dataclass
class Session:
    """What every step shares: resolved config, hardware, model files, tokenizer, data, the model holder."""

    config: RunConfig
    hw: Hardware
    model_dir: Path
    model_fp: str
    model_revision: str | None
    tokenizer: Any
    tokenizer_fp: dict[str, str]
    steps: list[StepData]
    quant: QuantSettings
    impl: str
    objective: Objective
    reporter: Reporter
    holder: Holder
    ranks: Ranks
    callbacks: list[StepCallback] = field(default_factory=list)
    heldout: list[StepData | None] = field(default_factory=list)  # each step's held-out pairs (engine/reference/heldout.py)
    events: PhaseEvents = field(default_factory=PhaseEvents)  # the caller's phase listeners (runtime/peaks.py)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def token_settings(self) -> dict[str, Any]:
        return {"max_length": self.config.max_length, "max_prompt_length": self.config.max_prompt_length}


def run_sdpo(
    config: RunConfig,
    *,
    resume: bool = False,
    extend: bool = False,
    reporter: Reporter | None = None,
    callbacks: list[StepCallback] | None = None,
    phase_listeners: Sequence[PhaseListener] = (),
) -> list[dict[str, Any]]:
    """Runs every step not yet done; returns the summaries of all steps. Under a launcher, on every rank.
    `extend` (with `resume`): the run may list steps after those it was started with (self-rewarding sDPO
    appends D_t per iteration). `phase_listeners` hear each phase, pass and model load start and end
    (runtime/peaks.py: PHASE_EVENTS)."""
    events = PhaseEvents(list(phase_listeners))
    with process_group() as ranks:
        return _run_all(config, ranks, events, resume=resume, extend=extend, reporter=reporter, callbacks=callbacks)


def _run_all(
    config: RunConfig,
    ranks: Ranks,
    events: PhaseEvents,
    *,
    resume: bool,
    extend: bool,
    reporter: Reporter | None,
    callbacks: list[StepCallback] | None,
) -> list[dict[str, Any]]:
    # Ranks other than 0 show nothing: one progress bar and one table per run.
    reporter = reporter if ranks.is_main and reporter is not None else Reporter(config.quiet or not ranks.is_main)
    check_run_dir(config, resume)  # before anything slow is loaded
    check_tracker(config.report_to)
    ranks.barrier()  # every rank has checked the directory before rank 0 writes run.json into it
    hw = resolve_hardware(config)
    if not hw.is_cuda:
        reporter.note_once("no CUDA device: running on CPU; 4-bit layers on CPU are slow beyond toy models")
    objective = Objective(config.loss, config.beta, dict(config.loss_options))
    objective.spec  # noqa: B018 - raises InputError for an unknown loss before anything is loaded
    # A resumed run loads the very commit it started from, whatever the branch points at now.
    model_dir = resolve_model(config.model, pinned_revision(Path(config.output_dir)) if resume else config.revision)
    steps = load_steps(
        config.steps,
        columns=parse_columns(config.columns),
        seed=config.seed,
        desirable_threshold=config.desirable_threshold,
    )
    steps, heldout = heldout_data(config, steps)
    for step in [*steps, *(h for h in heldout if h is not None)]:
        objective.check_data("unpaired" if step.unpaired else "pairs", step.label)
    tokenizer = load_tokenizer(str(model_dir))
    # On CPU glibc's heap would keep ~10x a checkpointed step's live tensors: bounded unless asked not to.
    model = open_model(
        model_dir,
        hw,
        double_quant=config.double_quant,
        reference=config.reference,
        merge=config.merge,
        reporter=reporter,
        bound_cpu_heap=config.bound_cpu_heap,
        events=events,
    )
    session = Session(
        config=config,
        hw=hw,
        model_dir=model_dir,
        model_fp=model_fingerprint(model_dir),
        model_revision=hub_commit(model_dir),
        tokenizer=tokenizer,
        tokenizer_fp=tokenizer_fingerprint(model_dir, tokenizer),
        steps=steps,
        quant=model.quant,
        impl=training_impl(hw, config.logprob_impl, deterministic=config.deterministic),
        objective=objective,
        reporter=reporter,
        holder=model.holder,
        ranks=ranks,
        callbacks=list(callbacks or []),
        heldout=heldout,
        events=events,
    )
    prepare_run_dir(session, resume, extend)
    # one tracker per run: rank 0 feeds it (every rank holds the same rows)
    tracker = open_tracker(config.report_to, session.out, config.to_dict()) if ranks.is_main else None
    if tracker is not None:
        session.callbacks.append(tracker)

    summaries: list[dict[str, Any]] = []
    chain: list[Path] = []  # adapters whose sum with S gives M_{t-1}
    try:
        for t, step in enumerate(steps, start=1):
            done = read_summary(step_dir(session.out, t))
            if done is not None:
                reporter.note(f"step {t} ({step.label}): already done, skipped")
                summary = done
            else:
                summary = _run_step(session, t, step, chain, resume=resume)
            summaries.append(summary)
            chain = [session.out / c for c in summary["adapter_chain"]]
    finally:
        session.holder.release()
        if tracker is not None:
            tracker.close()
    return summaries


def _cache_parts(
    session: Session, chain: list[Path], step: StepData, units: list[Unit], with_kl: bool
) -> dict[str, Any]:
    requantized = session.config.reference == "requantized"
    return {
        "model": session.model_fp,
        "model_revision": session.model_revision,
        "adapters": adapter_chain_digest(chain),
        "reference": session.config.reference if chain else None,
        "merge": session.config.merge if chain and requantized else None,
        "quant": session.quant.to_dict(),
        "data": step.fingerprint(),
        "tokenization": session.token_settings(),
        "tokenizer": session.tokenizer_fp,
        "units": units_digest(units),  # every token id: any tokenizer or template change shows here
        "seed_units": session.config.seed,  # unpaired units are a seeded matching of examples
        "logprob_impl": session.impl,
        "kl_rows": with_kl,
        "device_type": session.hw.device.type,
    }


def _logps(
    session: Session, chain: list[Path], step: StepData, units: list[Unit], path: Path, description: str, span: str
) -> LogpTable:
    """Cached or computed log-probs of the model S + chain on the units."""
    with_kl = session.objective.needs_kl
    # Nothing in the parts depends on the number of ranks: any rank count reuses the cache.
    table, reused = cached_logps(
        path,
        _cache_parts(session, chain, step, units, with_kl),
        lambda: _table(session, session.holder.model_for(chain), units, description, span, with_kl=with_kl),
        need_kl=with_kl,
        ranks=session.ranks,
    )
    if reused:
        session.reporter.note(f"{description}: reusing cache {path.name}")
    return table


def _table(
    session: Session, model: torch.nn.Module, units: list[Unit], description: str, span: str, *, with_kl: bool = False
) -> LogpTable:
    """Log-probs of `model` on `units`, told to phase listeners as the pass `span` (PHASE_EVENTS)."""
    with session.events.span(span):
        return compute_logps(model, units, pad_id=session.tokenizer.pad_token_id,
                             batch_size=reference_batch_size(session.config), hw=session.hw, impl=session.impl,
                             with_kl=with_kl, reporter=session.reporter, description=description,
                             ranks=session.ranks)  # fmt: skip


def _run_step(session: Session, t: int, step: StepData, chain: list[Path], *, resume: bool) -> dict[str, Any]:
    """One step; a CUDA allocation failure anywhere in it (the allocator's, or cuBLAS / cuDNN / Triton's)
    becomes OutOfMemory with where memory went, phase by phase."""
    peaks = PhasePeaks(session.hw, session.events)
    with out_of_memory_reported(peaks, f"step {t}"), session.events.in_step(t):
        return _run_step_inner(session, t, step, chain, peaks, resume=resume)


def measures_shift(cfg: RunConfig) -> bool:
    """Whether a step ends with P_t's pass over the drift sample (its training shift). The figure is what the
    requantized mode's drift is read against; in exact mode, where the drift is 0 by construction, the pass
    would cost as much as the reference pass on a small step for a figure nobody asked for, so it waits for
    --diagnostics."""
    return cfg.diagnostics or cfg.reference == "requantized"


def drift_sample(n_units: int, seed: int, t: int) -> list[int]:
    """A fixed, seeded sample of D_t's units (sorted: the same sample reads the same in any listing)."""
    k = min(DRIFT_SAMPLE, n_units)
    return sorted(random.Random(f"drift-{seed}-{t}").sample(range(n_units), k))


def _ratios(table: LogpTable) -> torch.Tensor:
    return table.chosen.double() - table.rejected.double()


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


@dataclass
class References:
    """What the reference phase of step t yields."""

    table: LogpTable  # M_{t-1} on every unit of D_t
    gamma_base: float | None  # gamma of S on D_t (--diagnostics)
    drift: float  # mean |ratio of the reference - ratio of the trained P_{t-1}| on the drift sample
    sample_ratios: torch.Tensor  # the reference's log-ratios on the drift sample


def _reference_phase(
    session: Session, t: int, step: StepData, chain: list[Path], units: list[Unit], sample: list[int], sdir: Path
) -> References:
    cfg, holder = session.config, session.holder
    # The trained P_{t-1} on the sample, where the reference is not P_{t-1} itself (requantized mode).
    drift_model = holder.drift_model(chain)
    trained_prev = None
    if drift_model is not None:
        trained_prev = _table(
            session, drift_model, [units[i] for i in sample], f"step {t}: P_{t - 1} on the drift sample", "drift_pass"
        )
    del drift_model
    gamma_base = None
    if cfg.diagnostics and chain:
        base = _logps(session, [], step, units, sdir / BASE_CACHE, f"step {t}: S log-probs", "base_pass")
        gamma_base = base.gamma_mean()
    description = f"step {t}: reference log-probs (M_{t - 1})"
    table = _logps(session, chain, step, units, sdir / REFERENCE_CACHE, description, "reference_pass")
    if cfg.diagnostics and not chain:
        gamma_base = table.gamma_mean()  # M_0 is S
    session.reporter.note(
        f"step {t}: gamma_ref = {table.gamma_mean():.3f}"
        + (f", gamma of S = {gamma_base:.3f}" if gamma_base is not None else "")
    )
    sample_ratios = _ratios(table)[sample]
    drift = 0.0 if trained_prev is None else _mean_abs_diff(sample_ratios, _ratios(trained_prev))
    return References(table, gamma_base, drift, sample_ratios)


def _train_phase(
    session: Session,
    t: int,
    units: list[Unit],
    reference: LogpTable,
    policy_chain: list[Path],
    sdir: Path,
    step_seed: int,
    *,
    resume: bool,
    evaluate: HeldOut | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """A fresh LoRA on S + policy_chain, trained on D_t; returns the policy and the metrics rows."""
    cfg = session.config
    policy = add_lora(
        session.holder.model_for(policy_chain),
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        dropout_impl=cfg.lora_dropout_impl,
        seed=step_seed,
    )
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy.get_base_model())
    # The global schedule: micro-batches of batch_size x ranks units, each rank running its part.
    schedule = build_schedule(
        len(units),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size * session.ranks.world,
        grad_accum=cfg.grad_accum,
        seed=step_seed,
    )
    job = StepJob(
        t=t,
        step_dir=sdir,
        units=units,
        reference=reference,
        schedule=schedule,
        objective=session.objective,
        config=cfg,
        hw=session.hw,
        impl=session.impl,
        pad_id=session.tokenizer.pad_token_id,
        reporter=session.reporter,
        seed=step_seed,
        callbacks=session.callbacks,
        evaluate=evaluate,
        eval_every=cfg.eval_every,
        ranks=session.ranks,
    )
    return policy, train_step(policy, job, resume=resume)


def _heldout(session: Session, t: int, chain: list[Path], sdir: Path) -> HeldOut | None:
    """Step t's held-out units with the reference M_{t-1}'s log-probs on them, cached like D_t's."""
    data = session.heldout[t - 1] if session.heldout else None
    if data is None:
        return None
    tokenized = tokenize_step(data, session.tokenizer, **session.token_settings())
    units, _ = build_units(tokenized, seed=session.config.seed, label=data.label)
    description = f"step {t}: reference log-probs (held out)"
    reference = _logps(session, chain, data, units, sdir / EVAL_REFERENCE_CACHE, description, "heldout_pass")
    return HeldOut(
        units,
        reference,
        session.config.beta,
        score=lambda model, held: _table(session, model, held, f"step {t}: held-out evaluation", "heldout_pass"),
    )


def _run_step_inner(
    session: Session, t: int, step: StepData, chain: list[Path], peaks: PhasePeaks, *, resume: bool
) -> dict[str, Any]:
    cfg, reporter = session.config, session.reporter
    sdir = step_dir(session.out, t)
    if session.ranks.is_main:
        sdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenized: TokenizedStep = tokenize_step(step, session.tokenizer, **session.token_settings())
    units, kind = build_units(tokenized, seed=cfg.seed, label=step.label)
    reporter.note(f"step {t}/{len(session.steps)}: {step.label} ({kind}, {len(units)} units)")

    step_seed = cfg.seed * 1000 + t  # LoRA init, data order and dropout of this step
    sample = drift_sample(len(units), cfg.seed, t)
    with peaks.phase("reference"):  # loading S (once per run) is part of the first step's reference phase
        refs = _reference_phase(session, t, step, chain, units, sample, sdir)
        heldout = _heldout(session, t, chain, sdir)
    policy_chain = chain if cfg.target_init == "previous" else []
    with peaks.phase("train"):
        policy, rows = _train_phase(
            session, t, units, refs.table, policy_chain, sdir, step_seed, resume=resume, evaluate=heldout
        )
    with peaks.phase("save"):
        training_shift = None
        if measures_shift(cfg):
            trained = _table(
                session, policy, [units[i] for i in sample], f"step {t}: P_{t} on the drift sample", "drift_pass"
            )
            training_shift = _mean_abs_diff(_ratios(trained), refs.sample_ratios)
        if session.ranks.is_main:
            with atomic_dir(sdir / ADAPTER_DIR) as tmp:
                policy.save_pretrained(str(tmp), safe_serialization=True)
        unwrap_policy(policy)  # the holder's model, plain again, for step t+1
        del policy
        release_memory()
    new_chain = [*policy_chain, sdir / ADAPTER_DIR]
    summary = {
        "step": t,
        "data": step.label,
        "source": step.source,
        "kind": kind,
        "loss": cfg.loss,
        "pairs_used": len(units),
        "gamma_ref_mean": refs.table.gamma_mean(),
        "gamma_base_mean": refs.gamma_base,
        "reference": cfg.reference,
        # mean |log-ratio of the reference used - log-ratio of the trained P_{t-1}| on a fixed sample of
        # D_t; 0 by construction in exact mode, where the reference is P_{t-1}'s own weights.
        "reference_drift": refs.drift,
        # the same sample's mean |log-ratio of P_t - log-ratio of the reference|: what this step moved
        # (None where not measured: exact mode without --diagnostics).
        "training_shift": training_shift,
        "drift_sample_units": len(sample) if measures_shift(cfg) else 0,
        "frozen_delta_parameters": session.holder.delta_parameters(),
        **training_figures(rows),
        # the allocator's peak counter is reset per phase: the step's peak is the largest phase peak
        "peak_memory_bytes": peaks.overall(),
        "peak_memory_bytes_by_phase": peaks.as_dict(),
        "memory_kind": "cuda_max_allocated" if session.hw.is_cuda else "cpu_max_rss",
        "wall_seconds": time.perf_counter() - started,
        "adapter_chain": [str(p.relative_to(session.out)) for p in new_chain],
        "target_init": cfg.target_init,
        "eval": heldout_summary(rows, heldout.reference if heldout else None),
    }
    if session.ranks.is_main:
        write_json(sdir / SUMMARY_FILE, summary)
        shutil.rmtree(sdir / "checkpoint", ignore_errors=True)  # the step is done; its summary marks it
    session.ranks.barrier()  # the next step loads this step's adapter: every rank waits for rank 0's files
    print_step_summary(reporter, summary)
    return summary
