"""`lowmem-sdpo run`: the sDPO pipeline over steps t = 1..T (M_0 = S, the model given).

Per step: materialise M_{t-1} in 4 bit (S + the adapters of steps < t, merged exactly), compute or reuse
the cached reference log-probs of D_t, put a fresh LoRA on M_{t-1} (or on S with --target-init base),
train, save the adapter and summary. runs/NAME/ holds run.json and step-t/ directories; a step is done when
its summary.json exists.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.atomic import atomic_dir, write_json
from lowmem_sdpo.data import StepData, TokenizedStep, load_steps, load_tokenizer, parse_columns, tokenize_step
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.failures import OutOfMemory, out_of_memory_message
from lowmem_sdpo.engine.hardware import Hardware, peak_memory_bytes, reset_peak, resolve_hardware
from lowmem_sdpo.engine.metrics import SUMMARY_FILE, read_summary
from lowmem_sdpo.engine.objective import Objective
from lowmem_sdpo.engine.reference import (
    LogpTable,
    adapter_chain_digest,
    cache_key,
    compute_logps,
    load_cache,
    save_cache,
)
from lowmem_sdpo.engine.reporting import Reporter
from lowmem_sdpo.engine.rundir import ADAPTER_DIR, BASE_CACHE, REFERENCE_CACHE, prepare_run_dir, step_dir
from lowmem_sdpo.engine.schedule import build_schedule
from lowmem_sdpo.engine.summary import print_step_summary, training_figures
from lowmem_sdpo.engine.trainer import StepCallback, StepJob, train_step
from lowmem_sdpo.engine.units import Unit, build_units
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized, model_fingerprint, resolve_model
from lowmem_sdpo_kernels import resolve_impl


@dataclass
class Session:
    """What every step shares: resolved config, hardware, model files, tokenizer, data."""

    config: RunConfig
    hw: Hardware
    model_dir: Path
    model_fp: str
    tokenizer: Any
    steps: list[StepData]
    quant: QuantSettings
    impl: str
    objective: Objective
    reporter: Reporter
    callbacks: list[StepCallback] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def token_settings(self) -> dict[str, Any]:
        return {"max_length": self.config.max_length, "max_prompt_length": self.config.max_prompt_length}


def run_sdpo(
    config: RunConfig,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    callbacks: list[StepCallback] | None = None,
) -> list[dict[str, Any]]:
    """Runs every step not yet done; returns the summaries of all steps."""
    reporter = reporter or Reporter(config.quiet)
    hw = resolve_hardware(config)
    if not hw.is_cuda:
        reporter.note_once("no CUDA device: running on CPU; 4-bit layers on CPU are slow beyond toy models")
    objective = Objective(config.loss, config.beta, dict(config.loss_options))
    objective.spec  # noqa: B018 - raises InputError for an unknown loss before anything is loaded
    model_dir = resolve_model(config.model)
    steps = load_steps(
        config.steps,
        columns=parse_columns(config.columns),
        seed=config.seed,
        desirable_threshold=config.desirable_threshold,
    )
    for step in steps:
        objective.check_data("unpaired" if step.unpaired else "pairs", step.label)
    session = Session(
        config=config,
        hw=hw,
        model_dir=model_dir,
        model_fp=model_fingerprint(model_dir),
        tokenizer=load_tokenizer(str(model_dir)),
        steps=steps,
        quant=QuantSettings(double_quant=config.double_quant, compute_dtype=hw.compute_dtype),
        impl=_impl(config.logprob_impl, hw),
        objective=objective,
        reporter=reporter,
        callbacks=list(callbacks or []),
    )
    prepare_run_dir(session, resume)

    summaries: list[dict[str, Any]] = []
    chain: list[Path] = []  # adapters whose merge into S gives M_{t-1}
    for t, step in enumerate(steps, start=1):
        done = read_summary(step_dir(session.out, t))
        if done is not None:
            reporter.note(f"step {t} ({step.label}): already done, skipped")
            summary = done
        else:
            summary = _run_step(session, t, step, chain, resume=resume)
        summaries.append(summary)
        chain = [session.out / c for c in summary["adapter_chain"]]
    return summaries


def _impl(name: str, hw: Hardware) -> str:
    try:
        return resolve_impl(name, torch.empty(0, device=hw.device))
    except ValueError as err:
        raise InputError(f"--logprob-impl {name}: {err}") from err


def _load(session: Session, chain: list[Path]) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    # transformers draws its own "Loading weights" bar per load; ours say what is being loaded and why.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_quantized(session, chain)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_quantized(session: Session, chain: list[Path]) -> torch.nn.Module:
    session.reporter.note(
        f"loading {'S' if not chain else f'S + {len(chain)} merged adapter(s)'} in 4 bit from {session.model_dir}"
    )
    return load_quantized(
        session.model_dir,
        adapters=chain,
        merge=session.config.merge,
        quant=session.quant,
        device=session.hw.device,
        progress=session.reporter.merge_progress(),
    )


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing. transformers renamed the method (and its kwargs argument) in the
    5.x series; the GPU image's older transformers has only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _release_memory() -> None:
    """Return freed model memory to the system / the CUDA allocator. Callers drop their references first:
    a reference passed in here would keep the model alive through the collection."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cache_parts(session: Session, chain: list[Path], step: StepData, with_kl: bool) -> dict[str, Any]:
    return {
        "model": session.model_fp,
        "adapters": adapter_chain_digest(chain),
        "merge": session.config.merge if chain else None,
        "quant": session.quant.to_dict(),
        "data": step.fingerprint(),
        "tokenization": session.token_settings(),
        "seed_units": session.config.seed,  # unpaired units are a seeded matching of examples
        "logprob_impl": session.impl,
        "kl_rows": with_kl,
        "device_type": session.hw.device.type,
    }


def _logps(
    session: Session,
    chain: list[Path],
    step: StepData,
    units: list[Unit],
    path: Path,
    description: str,
) -> tuple[LogpTable, torch.nn.Module | None]:
    """Cached or computed log-probs of the model S + chain on the units; returns the model if it loaded one."""
    with_kl = session.objective.needs_kl
    parts = _cache_parts(session, chain, step, with_kl)
    key = cache_key(parts)
    cached = load_cache(path, key, need_kl=with_kl)
    if cached is not None:
        session.reporter.note(f"{description}: reusing cache {path.name}")
        return cached, None
    model = _load(session, chain)
    table = compute_logps(
        model,
        units,
        pad_id=session.tokenizer.pad_token_id,
        batch_size=session.config.batch_size,
        hw=session.hw,
        impl=session.impl,
        with_kl=with_kl,
        reporter=session.reporter,
        description=description,
    )
    save_cache(path, key, parts, table)
    return table, model


def _run_step(session: Session, t: int, step: StepData, chain: list[Path], *, resume: bool) -> dict[str, Any]:
    """One step; a CUDA out-of-memory anywhere in it becomes OutOfMemory with where memory went."""
    try:
        return _run_step_inner(session, t, step, chain, resume=resume)
    except torch.cuda.OutOfMemoryError as err:
        hw = session.hw
        breakdown = {"allocated at failure": 0, "reserved by the caching allocator": 0}
        if hw.is_cuda:
            breakdown = {
                "allocated at failure": torch.cuda.memory_allocated(hw.device),
                "reserved by the caching allocator": torch.cuda.memory_reserved(hw.device),
            }
        raise OutOfMemory(
            out_of_memory_message(f"step {t}", peak_memory_bytes(hw), breakdown, str(err))
        ) from err


def _run_step_inner(
    session: Session, t: int, step: StepData, chain: list[Path], *, resume: bool
) -> dict[str, Any]:
    cfg, reporter = session.config, session.reporter
    sdir = step_dir(session.out, t)
    sdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reset_peak(session.hw)
    tokenized: TokenizedStep = tokenize_step(step, session.tokenizer, **session.token_settings())
    units, kind = build_units(tokenized, seed=cfg.seed, label=step.label)
    reporter.note(f"step {t}/{len(session.steps)}: {step.label} ({kind}, {len(units)} units)")

    step_seed = cfg.seed * 1000 + t  # LoRA init, data order and dropout of this step
    gamma_base = None
    if cfg.diagnostics and chain:
        base_table, base_model = _logps(session, [], step, units, sdir / BASE_CACHE, f"step {t}: S log-probs")
        gamma_base = base_table.gamma_mean()
        del base_model  # S is not needed again: free it before M_{t-1} is loaded
        _release_memory()
    reference, model = _logps(
        session, chain, step, units, sdir / REFERENCE_CACHE, f"step {t}: reference log-probs (M_{t - 1})"
    )
    gamma_ref = reference.gamma_mean()
    if cfg.diagnostics and not chain:
        gamma_base = gamma_ref  # M_0 is S
    reporter.note(
        f"step {t}: gamma_ref = {gamma_ref:.3f}"
        + (f", gamma of S = {gamma_base:.3f}" if gamma_base is not None else "")
    )

    policy_chain = chain if cfg.target_init == "previous" else []
    if model is None or policy_chain != chain:
        model = None  # drop M_{t-1} (if loaded) before loading the target's base: never two models at once
        _release_memory()
        model = _load(session, policy_chain)
    policy = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=step_seed)
    del model  # the policy holds it
    if cfg.gradient_checkpointing:
        _enable_checkpointing(policy.get_base_model())
    schedule = build_schedule(
        len(units),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
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
        reporter=reporter,
        seed=step_seed,
        callbacks=session.callbacks,
    )
    rows = train_step(policy, job, resume=resume)

    with atomic_dir(sdir / ADAPTER_DIR) as tmp:
        policy.save_pretrained(str(tmp), safe_serialization=True)
    new_chain = [*policy_chain, sdir / ADAPTER_DIR]
    summary = {
        "step": t,
        "data": step.label,
        "source": step.source,
        "kind": kind,
        "loss": cfg.loss,
        "pairs_used": len(units),
        "gamma_ref_mean": gamma_ref,
        "gamma_base_mean": gamma_base,
        **training_figures(rows),
        "peak_memory_bytes": peak_memory_bytes(session.hw),
        "memory_kind": "cuda_max_allocated" if session.hw.is_cuda else "cpu_max_rss",
        "wall_seconds": time.perf_counter() - started,
        "adapter_chain": [str(p.relative_to(session.out)) for p in new_chain],
        "target_init": cfg.target_init,
    }
    write_json(sdir / SUMMARY_FILE, summary)
    shutil.rmtree(sdir / "checkpoint", ignore_errors=True)  # the step is done; its summary marks it
    del policy, job
    _release_memory()
    print_step_summary(reporter, summary)
    return summary
