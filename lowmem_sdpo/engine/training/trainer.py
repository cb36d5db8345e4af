"""Training one sDPO step: its window -- one optimiser step's gradients over D_t against cached reference
log-probs -- run by the shared loop (engine/training/loop.py: optimiser, checkpoints, signals, resume).

Chosen and rejected rows of a micro-batch go through one forward. Losses whose value couples the examples
of a batch (AOT sorts them) are computed over the whole optimiser step's window with exact gradients:
  1. a no-grad, dropout-free pass gives the policy log-probs of every unit in the window;
  2. the loss of the window is differentiated with respect to those log-probs (scalars: cheap), giving
     g_c, g_r = dL/d policy_chosen, dL/d policy_rejected per unit;
  3. each micro-batch is re-run with grad and backpropagates sum(g_c * policy_chosen + g_r * policy_rejected),
     whose parameter gradient is exactly the window loss's by the chain rule.
For the hard sort g is each unit's cost derivative against its same-rank partner, treated as a constant:
the sort spans micro-batches x accumulation steps, not one micro-batch of one or two pairs.

Data-parallel (runtime/distributed.py): the schedule is global, each rank runs its part of every global
micro-batch; a coupled window's pass-1 log-probs are gathered from every rank, so the sort spans all ranks,
and each rank backpropagates its own units' weights. KTO's KL reference point is the mean over the global
micro-batch's mismatched rows, gathered likewise. The gradients are summed across ranks before clipping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.reference.logps import LogpTable
from lowmem_sdpo.engine.training.checkpoint import CHECKPOINT_DIR, RngState
from lowmem_sdpo.engine.training.loop import (
    Describe,
    FiniteWatch,
    Loop,
    Scale,
    StepCallback,
    StopFlag,
    identity,
    train_loop,
)
from lowmem_sdpo.engine.training.objective import LogpBatch, Objective
from lowmem_sdpo.engine.training.schedule import Schedule
from lowmem_sdpo.engine.units import Unit, collate_kl, collate_units
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks
from lowmem_sdpo.runtime.failures import NonFiniteLoss
from lowmem_sdpo.runtime.hardware import Hardware, current_memory_bytes, peak_memory_bytes
from lowmem_sdpo.runtime.logprobs import batch_logprobs
from lowmem_sdpo.runtime.reporting import Reporter

__all__ = ["StepCallback", "StepJob", "accumulate_window", "train_step"]


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
    # Held-out evaluation (engine/reference/heldout.py): the policy -> the row's eval/... fields; at the step's
    # end and every eval_every optimiser steps (the loop runs it; see Loop.evaluate).
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None
    eval_every: int = 0
    ranks: Ranks = SINGLE


def _table_on(table: LogpTable, device: torch.device) -> LogpTable:
    def move(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    return LogpTable(
        table.chosen.to(device), table.rejected.to(device), move(table.kl_chosen), move(table.kl_rejected)
    )


def train_step(model: nn.Module, job: StepJob, *, resume: bool) -> list[dict[str, Any]]:
    """Runs (or continues) the optimiser loop of step t (engine/training/loop.py) with this module's window;
    returns the metrics rows of the whole step."""
    # The reference table goes to the device once, not a slice per micro-batch.
    job = dataclasses.replace(job, reference=_table_on(job.reference, job.hw.device))
    loop = Loop(
        name=f"step {job.t}",
        task=f"step {job.t}: training",
        out=job.step_dir,
        total=len(job.schedule),
        config=job.config,
        hw=job.hw,
        reporter=job.reporter,
        seed=job.seed,
        ranks=job.ranks,
        callbacks=job.callbacks,
        shown=_shown,
        evaluate=job.evaluate,
        eval_every=job.eval_every,
    )

    def window(model: nn.Module, k: int, stop: StopFlag, scale: Scale) -> dict[str, Any]:
        return accumulate_window(model, job, k, job.schedule[k], stop, scale)

    return train_loop(model, loop, window, resume=resume)


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "loss": row["loss"],
        "acc": row["reward_accuracy"],
        "tok_s": round(row["tokens_per_second"]),
        "mem_gib": round(row["memory_bytes"] / 2**30, 2),
    }


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


def _describe(job: StepJob, k: int) -> Describe:
    """The one-line message of a non-finite loss in optimiser step k, for FiniteWatch."""

    def describe(what: str, m: int, indices: list[int]) -> str:
        return (
            f"{what} loss at step {job.t}, optimiser step {k + 1}, micro-batch {m + 1} (units {indices[:8]}"
            f"{'...' if len(indices) > 8 else ''}); the optimiser step was not taken and the last checkpoint "
            f"in {job.step_dir / CHECKPOINT_DIR} (if any) is the last good state; try a lower --learning-rate"
        )

    return describe


def _elsewhere(job: StepJob, k: int) -> str:
    return (
        f"non-finite loss on another rank at step {job.t}, optimiser step {k + 1}; the optimiser step "
        f"was not taken; the last checkpoint in {job.step_dir / CHECKPOINT_DIR} (if any) is the last good state"
    )


def _check_finite(loss: torch.Tensor, job: StepJob, k: int, m: int, indices: list[int]) -> None:
    """At once (one sync): a coupled window's loss, which pass 2 differentiates."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(_describe(job, k)("NaN" if torch.isnan(loss).any() else "Inf", m, indices))


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
    model: nn.Module, job: StepJob, k: int, micro: list[list[int]], stop: StopFlag, scale: Scale | None = None
) -> dict[str, Any]:
    """Accumulates optimiser step k's gradients over its micro-batches; returns its metrics row (the loop's
    WindowFn, engine/training/loop.py). `micro` is the global window; this rank runs its part of each
    micro-batch (all of it in one process). `scale` multiplies each backward's root (fp16's GradScaler)."""
    started = time.perf_counter()
    pass_fn = _coupled_window if job.objective.batch_coupled else _independent_micro_batches
    window = Window(micro, [job.ranks.shard(mb) for mb in micro])
    watch = FiniteWatch()
    tokens, pieces = pass_fn(model, job, k, window, stop, scale or identity, watch)

    losses = torch.cat([p[0] for p in pieces]).float()
    cr = torch.cat([p[1] for p in pieces]).float()
    rr = torch.cat([p[2] for p in pieces]).float()
    pc = torch.cat([p[3].policy_chosen.detach() for p in pieces]).float()
    pr = torch.cat([p[3].policy_rejected.detach() for p in pieces]).float()
    # Sums and counts over this rank's share and its count of non-finite losses, summed over ranks, then the
    # window's one device->host copy: for the row, and for every rank to stop together on a bad loss.
    sums = torch.stack(
        [
            losses.sum(),
            cr.sum(),
            rr.sum(),
            (cr > rr).float().sum(),
            (cr - rr).sum(),
            pc.sum(),
            pr.sum(),
            torch.tensor(float(losses.numel()), device=losses.device),
            torch.tensor(float(cr.numel()), device=losses.device),
            torch.tensor(float(tokens), device=losses.device),
        ]
    ).double()
    totals = job.ranks.sum_(torch.cat([sums, watch.bad(sums.device).view(1)])).tolist()
    watch.raise_if_bad(totals[10], _describe(job, k), _elsewhere(job, k))
    n_losses, n_units, all_tokens = totals[7], totals[8], int(totals[9])
    figures = [totals[0] / n_losses] + [x / n_units for x in totals[1:7]]
    seconds = time.perf_counter() - started
    return {
        "step": job.t,
        "opt_step": k + 1,
        "units": window.size,
        **dict(zip(ROW_FIGURES, figures, strict=True)),
        "tokens": all_tokens,
        "tokens_per_second": all_tokens / max(seconds, 1e-9),
        "seconds": seconds,
        "memory_bytes": current_memory_bytes(job.hw),
        "peak_memory_bytes": peak_memory_bytes(job.hw),
    }


@dataclass(frozen=True)
class Window:
    """An optimiser step's micro-batches: the global ones (every rank's units) and this rank's parts."""

    micro: list[list[int]]
    mine: list[list[int]]

    @property
    def size(self) -> int:
        """Units in the global window: every rank scales its loss by it, so the summed gradient is the mean's."""
        return sum(len(mb) for mb in self.micro)


# Columns of a coupled window's gathered log-probs, one row per unit.
GATHERED = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens")


def _coupled_window(
    model: nn.Module, job: StepJob, k: int, window: Window, stop: StopFlag, scale: Scale, watch: FiniteWatch
) -> tuple[int, list[Piece]]:
    """Losses that sort the window (AOT): the three passes of the module docstring.

    Pass 1 runs in training mode, like pass 3, and each micro-batch's forward in pass 3 starts from the RNG
    state its pass-1 forward started from: both passes see the same dropout masks, so the ranking, the
    per-unit weights and the gradients all belong to one and the same stochastic forward.
    Over several ranks pass 1's per-unit log-probs are gathered from all of them (in rank order) before the
    sort, every rank differentiates the same global window loss, and pass 3 backpropagates this rank's units.
    """
    tokens = 0
    micro = [mb for mb in window.mine if mb]
    mine = [i for mb in micro for i in mb]
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
    whole, first = _gather_window(job, _cat_batches(parts, job.reference.chosen.device))
    pc = whole.policy_chosen.detach().requires_grad_(True)
    pr = whole.policy_rejected.detach().requires_grad_(True)
    whole = dataclasses.replace(whole, policy_chosen=pc, policy_rejected=pr)
    losses, cr, rr = job.objective(whole)
    _check_finite(losses, job, k, 0, mine)
    # 2. d(window loss) / d(per-unit policy log-probs)
    g_c, g_r = torch.autograd.grad(losses.mean(), [pc, pr])
    # 3. per micro-batch backward of the linear surrogate, replaying pass 1's dropout masks
    offset = first
    for m, mb in enumerate(micro):
        starts[m].restore()
        logp, _, used = _units_logps(model, job, mb)
        tokens += used
        b = len(mb)
        surrogate = (g_c[offset : offset + b] * logp[:b]).sum() + (g_r[offset : offset + b] * logp[b:]).sum()
        watch.add(surrogate, m, mb)
        scale(surrogate).backward()
        offset += b
        stop.poll()
    after.restore()  # the stream continues as if the window had been drawn once
    # This rank's share of the window's figures: its slice of the rank-k loss terms and of the units (the
    # slices of all ranks partition the window, so the row's sums over ranks are the window's).
    share = slice(first, first + len(mine))
    local_batch = LogpBatch(*(getattr(whole, f)[share].detach() for f in GATHERED))
    return tokens, [(losses[share].detach(), cr[share].detach(), rr[share].detach(), local_batch)]


def _cat_batches(parts: list[LogpBatch], device: torch.device) -> LogpBatch:
    """One LogpBatch of the parts' units, in order (empty tensors for a rank with no units this window)."""
    if not parts:
        return LogpBatch(*(torch.zeros(0, device=device) for _ in GATHERED))
    return LogpBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in GATHERED))


def _gather_window(job: StepJob, local: LogpBatch) -> tuple[LogpBatch, int]:
    """(the window of every rank's units, in rank order; where this rank's units start in it). One collective:
    the six per-unit columns travel as one [units, 6] fp32 tensor (token counts are exact in fp32)."""
    if not job.ranks.is_distributed:
        return local, 0
    device = job.reference.chosen.device
    columns = torch.stack([getattr(local, f).to(device).float() for f in GATHERED], dim=1)
    gathered, lengths = job.ranks.gather_cat(columns)
    like = [getattr(local, f) for f in GATHERED]
    whole = LogpBatch(*(gathered[:, i].to(like[i].dtype) for i in range(len(GATHERED))))
    return whole, sum(lengths[: job.ranks.rank])


def _independent_micro_batches(
    model: nn.Module, job: StepJob, k: int, window: Window, stop: StopFlag, scale: Scale, watch: FiniteWatch
) -> tuple[int, list[Piece]]:
    """Losses of one example at a time: each micro-batch's loss, scaled to the global window mean,
    backpropagated. KTO's KL reference point spans the global micro-batch (every rank's KL rows)."""
    tokens = 0
    pieces: list[Piece] = []
    for m, mb in enumerate(window.mine):
        if not mb:  # a short last micro-batch left this rank nothing; it still joins the KL gather
            if job.objective.needs_kl:
                _global_kl(job, None)
            continue
        logp, n, used = _units_logps(model, job, mb)
        tokens += used
        kl = None
        if job.objective.needs_kl:
            kl, kl_used = _kl_logps(model, job, mb)
            tokens += kl_used
        batch = _logp_batch(job, mb, logp, n, kl)
        if job.objective.needs_kl:
            batch = _global_kl(job, batch)
        losses, cr, rr = job.objective(batch)
        watch.add(losses, m, mb)
        # Mean over the window's loss terms (a term per unit, or per example for KTO).
        terms_per_unit = len(losses) / len(mb)
        scale(losses.sum() / (terms_per_unit * window.size)).backward()
        pieces.append((losses.detach(), cr.detach(), rr.detach(), batch))
        stop.poll()
    if not pieces:
        empty = torch.zeros(0, device=job.reference.chosen.device)
        pieces.append((empty, empty, empty, LogpBatch(*[empty] * len(GATHERED))))
    return tokens, pieces


def _global_kl(job: StepJob, batch: LogpBatch | None) -> LogpBatch | None:
    """`batch` with the KL rows of every rank's part of this micro-batch (KTO's z0 is their mean, detached:
    the gathered values need no gradient); None in, None out for a rank with no part. A no-op in one process."""
    if not job.ranks.is_distributed:
        return batch
    local = torch.zeros(0, 2, device=job.reference.chosen.device)
    if batch is not None and batch.policy_kl is not None and batch.ref_kl is not None:
        local = torch.stack([batch.policy_kl.float(), batch.ref_kl.to(batch.policy_kl.device).float()], dim=1)
    gathered, _ = job.ranks.gather_cat(local)
    if batch is None or batch.policy_kl is None or batch.ref_kl is None:
        return batch
    return dataclasses.replace(
        batch,
        policy_kl=gathered[:, 0].to(batch.policy_kl.dtype),
        ref_kl=gathered[:, 1].to(batch.ref_kl.dtype),
    )
