"""Training one sDPO step: the optimiser loop over D_t against cached reference log-probs.

Chosen and rejected rows of a micro-batch go through one forward. Losses whose value couples the examples
of a batch (AOT sorts them) are computed over the whole optimiser step's window with exact gradients:
  1. a no-grad, dropout-free pass gives the policy log-probs of every unit in the window;
  2. the loss of the window is differentiated with respect to those log-probs (scalars: cheap), giving
     g_c, g_r = dL/d policy_chosen, dL/d policy_rejected per unit;
  3. each micro-batch is re-run with grad and backpropagates sum(g_c * policy_chosen + g_r * policy_rejected),
     whose parameter gradient is exactly the window loss's by the chain rule.
For the hard sort g is each unit's cost derivative against its same-rank partner, treated as a constant:
the sort spans micro-batches x accumulation steps, not one micro-batch of one or two pairs.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.engine.checkpoint import RngState, TrainState, load_checkpoint, save_checkpoint
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.failures import NonFiniteLoss, RunInterrupted
from lowmem_sdpo.engine.hardware import Hardware, current_memory_bytes, peak_memory_bytes
from lowmem_sdpo.engine.heldout import due
from lowmem_sdpo.engine.logprobs import batch_logprobs
from lowmem_sdpo.engine.metrics import METRICS_FILE, MetricsLog
from lowmem_sdpo.engine.objective import LogpBatch, Objective
from lowmem_sdpo.engine.optim import cosine_with_warmup, make_optimizer, resolve_optimizer
from lowmem_sdpo.engine.reference import LogpTable
from lowmem_sdpo.engine.reporting import Reporter
from lowmem_sdpo.engine.schedule import Schedule
from lowmem_sdpo.engine.units import Unit, collate_kl, collate_units
from lowmem_sdpo.errors import InputError

# Called after every optimiser step with the metrics row (tests use it to interrupt a run at a chosen step).
StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class StepJob:
    t: int
    step_dir: Path
    units: list[Unit]
    reference: LogpTable
    schedule: Schedule
    objective: Objective
    config: RunConfig
    hw: Hardware
    impl: str
    pad_id: int
    reporter: Reporter
    seed: int
    callbacks: list[StepCallback] = field(default_factory=list)
    # Held-out evaluation (engine/heldout.py): the policy -> the row's eval/... fields; at the step's end and
    # every eval_every optimiser steps. It runs without dropout and draws no random numbers, so the
    # training stream (and resume's bit-for-bit promise) is the same with it or without.
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None
    eval_every: int = 0


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after every micro-batch. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, _frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signal.Signals(signum).name

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class _Stop(Exception):
    pass


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _table_on(table: LogpTable, device: torch.device) -> LogpTable:
    def move(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    return LogpTable(
        table.chosen.to(device), table.rejected.to(device), move(table.kl_chosen), move(table.kl_rejected)
    )


def train_step(model: nn.Module, job: StepJob, *, resume: bool) -> list[dict[str, Any]]:
    """Runs (or continues) the optimiser loop of step t; returns the metrics rows of the whole step."""
    # The reference table goes to the device once, not a slice per micro-batch.
    job = dataclasses.replace(job, reference=_table_on(job.reference, job.hw.device))
    cfg = job.config
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        resolve_optimizer(cfg.optim, job.hw.is_cuda), params, cfg.learning_rate, cfg.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, len(job.schedule), cfg.warmup_ratio)
    # fp16 has too little range for small gradients: scale the loss up, unscale before clipping, skip a
    # step whose gradients overflowed. bf16 and fp32 have fp32's range and need none.
    scaler = torch.amp.GradScaler(job.hw.device.type) if job.hw.needs_grad_scaler else None
    start = 0
    checkpoint = load_checkpoint(job.step_dir) if resume else None
    if checkpoint is not None:
        from peft import set_peft_model_state_dict

        _check_optimizer(checkpoint.state.optimizer, optimizer, job)
        set_peft_model_state_dict(model, checkpoint.adapter)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        if scaler is not None and checkpoint.scaler is not None:
            scaler.load_state_dict(checkpoint.scaler)
        checkpoint.rng.restore()
        start = checkpoint.state.opt_steps_done
        job.reporter.note(f"step {job.t}: resuming at optimiser step {start + 1}/{len(job.schedule)}")
    else:
        torch.manual_seed(job.seed)  # dropout and everything random in the loop start from the step's seed
    log = MetricsLog(job.step_dir / METRICS_FILE, keep_lines=start)

    model.train()
    stop = _StopFlag()
    total = len(job.schedule)

    def checkpoint_now(done: int, rng: RngState) -> None:
        save_checkpoint(
            job.step_dir,
            adapter_state=trainable_state(model),
            optimizer=optimizer,
            scheduler=scheduler,
            rng=rng,
            state=TrainState(opt_steps_done=done, optimizer=type(optimizer).__name__),
            scaler=scaler,
        )

    def interrupted(when: str, step: int) -> RunInterrupted:
        return RunInterrupted(
            f"{stop.signal}: step {job.t} stopped {when} optimiser step {step}/{total}; "
            f"checkpoint saved in {job.step_dir / 'checkpoint'}; continue with --resume"
        )

    with stop.installed(), job.reporter.task(f"step {job.t}: training", total=total) as advance:
        advance(start)
        for k in range(start, total):
            boundary = RngState.capture()
            try:
                row = accumulate_window(model, job, k, job.schedule[k], stop, scaler.scale if scaler else None)
            except _Stop:
                checkpoint_now(k, boundary)
                raise interrupted("before", k + 1) from None
            row["lr"] = optimizer.param_groups[0]["lr"]
            if scaler is None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
            else:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)  # skipped when the gradients hold an inf / NaN
                row["grad_scale"] = float(scaler.get_scale())
                scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if job.evaluate is not None and due(k + 1, total, job.eval_every):
                row |= job.evaluate(model)
                model.train()
            log.append(row)
            advance(
                1,
                loss=row["loss"],
                acc=row["reward_accuracy"],
                tok_s=round(row["tokens_per_second"]),
                mem_gib=round(row["memory_bytes"] / 2**30, 2),
            )
            done = k + 1
            saved = done % cfg.save_every == 0 and done < total
            if saved:
                checkpoint_now(done, RngState.capture())
            for callback in job.callbacks:
                callback(row)
            if stop.signal is not None and done < total:
                if not saved:
                    checkpoint_now(done, RngState.capture())
                raise interrupted("after", done)
    return log.rows


def _check_optimizer(saved: str, optimizer: torch.optim.Optimizer, job: StepJob) -> None:
    """Another optimiser class cannot load this state (torch AdamW state into bitsandbytes' 8-bit AdamW fails
    only at its first step, with a KeyError): refuse it in one line instead."""
    now = type(optimizer).__name__
    if saved and saved != now:
        raise InputError(
            f"--resume: step {job.t}'s checkpoint holds {saved} state, this run would use {now} "
            f"(--optim {job.config.optim} on {job.hw.device.type}); resume with the optimiser it was started with"
        )


def _units_logps(
    model: nn.Module, job: StepJob, indices: list[int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Policy (summed log-probs [2B], answer tokens [2B], tokens processed) of the units' chosen+rejected rows."""
    batch = collate_units([job.units[i] for i in indices], job.pad_id)
    logp, n = batch_logprobs(model, batch, hw=job.hw, impl=job.impl)
    return logp, n, int(batch["attention_mask"].sum())


def _logp_batch(
    job: StepJob, indices: list[int], logp: torch.Tensor, n: torch.Tensor, kl: torch.Tensor | None
) -> LogpBatch:
    b = len(indices)
    ref = job.reference
    idx = torch.tensor(indices, device=ref.chosen.device)  # train_step moved the table to the device once
    device = logp.device
    ref_kl = None
    if kl is not None and ref.kl_chosen is not None and ref.kl_rejected is not None:
        ref_kl = torch.cat([ref.kl_chosen[idx], ref.kl_rejected[idx]]).to(device)
    return LogpBatch(
        policy_chosen=logp[:b],
        policy_rejected=logp[b:],
        ref_chosen=ref.chosen[idx].to(device),
        ref_rejected=ref.rejected[idx].to(device),
        chosen_tokens=n[:b],
        rejected_tokens=n[b:],
        policy_kl=kl,
        ref_kl=ref_kl,
    )


def _kl_logps(model: nn.Module, job: StepJob, indices: list[int]) -> tuple[torch.Tensor, int]:
    """Policy log-probs of the mismatched rows, no grad (KTO's reference point is detached anyway)."""
    batch = collate_kl(job.units, indices, job.pad_id)
    with torch.no_grad():
        logp, _ = batch_logprobs(model, batch, hw=job.hw, impl=job.impl)
    return logp, int(batch["attention_mask"].sum())


def _check_finite(loss: torch.Tensor, job: StepJob, k: int, m: int, indices: list[int]) -> None:
    if not torch.isfinite(loss).all():
        what = "NaN" if torch.isnan(loss).any() else "Inf"
        raise NonFiniteLoss(
            f"{what} loss at step {job.t}, optimiser step {k + 1}, micro-batch {m + 1} (units {indices[:8]}"
            f"{'...' if len(indices) > 8 else ''}); the optimiser step was not taken and the last checkpoint "
            f"in {job.step_dir / 'checkpoint'} (if any) is the last good state; try a lower --learning-rate"
        )


class _FiniteWatch:
    """Finds a non-finite micro-batch loss with one device->host sync at the end of the window instead of one
    per micro-batch (on a GPU each sync stalls the queue of kernels behind it). A bad micro-batch's gradient
    still lands in the accumulators, but the optimiser step is never taken, so nothing reaches the weights."""

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._where: list[tuple[int, list[int], torch.Tensor]] = []

    def add(self, loss: torch.Tensor, m: int, indices: list[int]) -> None:
        self._flags.append(torch.isfinite(loss).all())
        self._where.append((m, indices, loss.detach()))

    def check(self, job: StepJob, k: int) -> None:
        if not self._flags:
            return
        for good, (m, indices, loss) in zip(torch.stack(self._flags).tolist(), self._where, strict=True):
            if not good:
                _check_finite(loss, job, k, m, indices)


Scale = Callable[[torch.Tensor], torch.Tensor]


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


Piece = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, LogpBatch
]  # losses, chosen/rejected rewards, log-probs


ROW_FIGURES = (
    "loss",
    "rewards_chosen",
    "rewards_rejected",
    "reward_accuracy",
    "reward_margin",
    "logps_chosen",
    "logps_rejected",
)


def accumulate_window(
    model: nn.Module, job: StepJob, k: int, micro: list[list[int]], stop: _StopFlag, scale: Scale | None = None
) -> dict[str, Any]:
    """Accumulates optimiser step k's gradients over its micro-batches; returns its metrics row.
    `scale` multiplies each backward's root (fp16's GradScaler); identity by default."""
    started = time.perf_counter()
    pass_fn = _coupled_window if job.objective.batch_coupled else _independent_micro_batches
    tokens, pieces = pass_fn(model, job, k, micro, stop, scale or _identity)

    losses = torch.cat([p[0] for p in pieces]).float()
    cr = torch.cat([p[1] for p in pieces]).float()
    rr = torch.cat([p[2] for p in pieces]).float()
    pc = torch.cat([p[3].policy_chosen.detach() for p in pieces]).float()
    pr = torch.cat([p[3].policy_rejected.detach() for p in pieces]).float()
    # One device->host copy for the whole row.
    figures = torch.stack(
        [losses.mean(), cr.mean(), rr.mean(), (cr > rr).float().mean(), (cr - rr).mean(), pc.mean(), pr.mean()]
    ).tolist()
    seconds = time.perf_counter() - started
    return {
        "step": job.t,
        "opt_step": k + 1,
        "units": sum(len(mb) for mb in micro),
        **dict(zip(ROW_FIGURES, figures, strict=True)),
        "tokens": tokens,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "seconds": seconds,
        "memory_bytes": current_memory_bytes(job.hw),
        "peak_memory_bytes": peak_memory_bytes(job.hw),
    }


def _coupled_window(
    model: nn.Module, job: StepJob, k: int, micro: list[list[int]], stop: _StopFlag, scale: Scale
) -> tuple[int, list[Piece]]:
    """Losses that sort the window (AOT): the three passes of the module docstring.

    Pass 1 runs in training mode, like pass 3, and each micro-batch's forward in pass 3 starts from the RNG
    state its pass-1 forward started from: both passes see the same dropout masks, so the ranking, the
    per-unit weights and the gradients all belong to one and the same stochastic forward.
    """
    tokens = 0
    window = [i for mb in micro for i in mb]
    # 1. rank the whole window without grad, recording each micro-batch's RNG state
    starts: list[RngState] = []
    with torch.no_grad():
        parts = []
        for mb in micro:
            starts.append(RngState.capture())
            logp, n, used = _units_logps(model, job, mb)
            tokens += used
            parts.append(_logp_batch(job, mb, logp, n, None))
    after = RngState.capture()
    pc = torch.cat([p.policy_chosen for p in parts]).detach().requires_grad_(True)
    pr = torch.cat([p.policy_rejected for p in parts]).detach().requires_grad_(True)
    whole = LogpBatch(
        pc,
        pr,
        torch.cat([p.ref_chosen for p in parts]),
        torch.cat([p.ref_rejected for p in parts]),
        torch.cat([p.chosen_tokens for p in parts]),
        torch.cat([p.rejected_tokens for p in parts]),
    )
    losses, cr, rr = job.objective(whole)
    _check_finite(losses, job, k, 0, window)
    # 2. d(window loss) / d(per-unit policy log-probs)
    g_c, g_r = torch.autograd.grad(losses.mean(), [pc, pr])
    # 3. per micro-batch backward of the linear surrogate, replaying pass 1's dropout masks
    offset = 0
    watch = _FiniteWatch()
    for m, mb in enumerate(micro):
        starts[m].restore()
        logp, _, used = _units_logps(model, job, mb)
        tokens += used
        b = len(mb)
        surrogate = (g_c[offset : offset + b] * logp[:b]).sum() + (g_r[offset : offset + b] * logp[b:]).sum()
        watch.add(surrogate, m, mb)
        scale(surrogate).backward()
        offset += b
        if stop.signal is not None:
            raise _Stop
    watch.check(job, k)
    after.restore()  # the stream continues as if the window had been drawn once
    return tokens, [(losses.detach(), cr.detach(), rr.detach(), whole)]


def _independent_micro_batches(
    model: nn.Module, job: StepJob, k: int, micro: list[list[int]], stop: _StopFlag, scale: Scale
) -> tuple[int, list[Piece]]:
    """Losses of one example at a time: each micro-batch's loss, scaled to the window mean, backpropagated."""
    tokens = 0
    window_units = sum(len(mb) for mb in micro)
    pieces: list[Piece] = []
    watch = _FiniteWatch()
    for m, mb in enumerate(micro):
        logp, n, used = _units_logps(model, job, mb)
        tokens += used
        kl = None
        if job.objective.needs_kl:
            kl, kl_used = _kl_logps(model, job, mb)
            tokens += kl_used
        batch = _logp_batch(job, mb, logp, n, kl)
        losses, cr, rr = job.objective(batch)
        watch.add(losses, m, mb)
        # Mean over the window's loss terms (a term per unit, or per example for KTO).
        terms_per_unit = len(losses) / len(mb)
        scale(losses.sum() / (terms_per_unit * window_units)).backward()
        pieces.append((losses.detach(), cr.detach(), rr.detach(), batch))
        if stop.signal is not None:
            raise _Stop
    watch.check(job, k)
    return tokens, pieces
