"""The training loop that sDPO (engine/training/trainer.py) and SFT (sft/window.py) share.

What differs between them is one function, the window: it accumulates one optimiser step's gradients and
returns that step's metrics row. Everything around it is here, once:

    rows = train_loop(model, Loop(name="step 1", out=step_dir, total=len(schedule), ...), window, resume=...)

    window(model, k, stop, scale) -> row      (the WindowFn protocol below)
      - runs optimiser step k's micro-batches (this rank's part of each) and backpropagates scale(loss) of
        each, the loss already divided so that the gradients summed over the window and the ranks are the
        window mean's;
      - calls stop.poll() after each micro-batch (it raises WindowStopped once SIGINT/SIGTERM arrived in a
        one-process run: the loop then saves the boundary before step k and stops);
      - syncs with the host once (a FiniteWatch's count of non-finite losses travels in the same tensor as
        the row's figures) and raises NonFiniteLoss before returning if any loss was NaN / Inf, so the
        optimiser step is never taken;
      - returns the row (the loop adds "lr", and "grad_scale" under fp16).

The loop: optimiser (--optim, refused on resume if the checkpoint holds another class's state), cosine
schedule with warm-up, fp16's GradScaler, restore of a checkpoint (adapter, optimiser, schedule, scaler, each
rank's RNG), gradients summed over ranks, unscale -> clip -> step, held-out evaluation when due,
metrics.jsonl, the progress bar, a checkpoint every --save-every steps and on SIGINT/SIGTERM (exit 130 via
RunInterrupted), the callbacks after every step (trackers; tests interrupt runs with them).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.reference.heldout import due
from lowmem_sdpo.engine.rundir.metrics import METRICS_FILE, MetricsLog
from lowmem_sdpo.engine.training.checkpoint import (
    CHECKPOINT_DIR,
    RngState,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from lowmem_sdpo.engine.training.optim import cosine_with_warmup, make_optimizer, resolve_optimizer
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks
from lowmem_sdpo.runtime.failures import NonFiniteLoss, RunInterrupted
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.reporting import Reporter

# Called after every optimiser step with the metrics row (trackers; tests use it to interrupt a run at a step).
StepCallback = Callable[[dict[str, Any]], None]
# Multiplies each backward's root (fp16's GradScaler.scale); the identity elsewhere.
Scale = Callable[[torch.Tensor], torch.Tensor]


def identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


class WindowStopped(Exception):
    """Raised by StopFlag.poll() inside a window: the loop discards the partial accumulation."""


class StopFlag:
    """Set by SIGINT/SIGTERM; windows poll it after every micro-batch. A second SIGINT aborts at once.

    Over several ranks a signal may reach one rank only, or each at another micro-batch: there the ranks agree
    on it at each optimiser-step boundary (one collective per step) and stop together after that step."""

    def __init__(self, ranks: Ranks = SINGLE) -> None:
        self.ranks = ranks
        self.signal: str | None = None

    def poll(self) -> None:
        """Inside a window: stop now (one process only; ranks wait for the boundary so none is left waiting)."""
        if self.signal is not None and not self.ranks.is_distributed:
            raise WindowStopped

    def at_boundary(self) -> bool:
        return self.ranks.any_(self.signal is not None)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
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


# (what: "NaN" or "Inf", micro-batch index, the items of that micro-batch) -> the one-line message
Describe = Callable[[str, int, list[int]], str]


class FiniteWatch:
    """Finds a non-finite micro-batch loss without a device->host sync per micro-batch (on a GPU each sync
    stalls the queue of kernels behind it): `bad()` is a device count that the window sends to the host with
    its row's figures, summed over ranks, so every rank raises together. A bad micro-batch's gradient still
    lands in the accumulators, but the optimiser step is never taken, so nothing reaches the weights."""

    def __init__(self) -> None:
        self._seen: list[tuple[int, list[int], torch.Tensor]] = []

    def add(self, loss: torch.Tensor, m: int, items: list[int]) -> None:
        self._seen.append((m, items, loss.detach()))

    def bad(self, device: torch.device) -> torch.Tensor:
        """The number of non-finite micro-batch losses so far: a 0-dim float64 tensor, not yet synced."""
        if not self._seen:
            return torch.zeros((), dtype=torch.float64, device=device)
        return (
            torch.stack([~torch.isfinite(loss).all() for _, _, loss in self._seen]).sum().double().to(device)
        )

    def raise_if_bad(self, bad_on_all_ranks: float, describe: Describe, elsewhere: str) -> None:
        """NonFiniteLoss naming this rank's first bad micro-batch, or `elsewhere` when only another rank had one."""
        if not bad_on_all_ranks:
            return
        for m, items, loss in self._seen:
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(describe("NaN" if torch.isnan(loss).any() else "Inf", m, items))
        raise NonFiniteLoss(elsewhere)


class WindowFn(Protocol):
    def __call__(self, model: nn.Module, k: int, stop: StopFlag, scale: Scale) -> dict[str, Any]: ...


@dataclass
class Loop:
    """What the loop needs besides the model and the window. `name` appears in its messages ("step 1 stopped
    after optimiser step 2/3", "SFT's checkpoint holds ..."), `task` is the progress bar's title."""

    name: str
    task: str
    out: Path  # checkpoint/ and metrics.jsonl live here
    total: int  # optimiser steps
    config: RunConfig  # optim, learning_rate, weight_decay, warmup_ratio, max_grad_norm, save_every
    hw: Hardware
    reporter: Reporter
    seed: int  # a fresh run's RNG seed (each rank's own: ranks.seed(seed))
    ranks: Ranks = SINGLE
    callbacks: list[StepCallback] = field(default_factory=list)
    # the progress bar's figures of a row
    shown: Callable[[dict[str, Any]], dict[str, Any]] = lambda row: {"loss": row["loss"]}
    # Held-out evaluation (engine/reference/heldout.py): the policy -> the row's eval/... fields, at the end and
    # every eval_every optimiser steps. It runs without dropout and draws no random numbers, so the training
    # stream (and resume's bit-for-bit promise) is the same with it or without.
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None
    eval_every: int = 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def train_loop(model: nn.Module, loop: Loop, window: WindowFn, *, resume: bool) -> list[dict[str, Any]]:
    """Runs (or continues, with `resume` and a checkpoint in loop.out) the optimiser loop; returns every
    step's metrics row (those of a resumed run's earlier steps included)."""
    cfg, ranks = loop.config, loop.ranks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        resolve_optimizer(cfg.optim, loop.hw.is_cuda), params, cfg.learning_rate, cfg.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, loop.total, cfg.warmup_ratio)
    # fp16 has too little range for small gradients: scale the loss up, unscale before clipping, skip a
    # step whose gradients overflowed. bf16 and fp32 have fp32's range and need none.
    scaler = torch.amp.GradScaler(loop.hw.device.type) if loop.hw.needs_grad_scaler else None
    start = _restore(model, loop, optimizer, scheduler, scaler) if resume else None
    if start is None:
        start = 0
        # dropout and everything random in the loop start from the seed (rank 0: the one-process one)
        torch.manual_seed(ranks.seed(loop.seed))
    ranks.broadcast_(params)  # replicas start equal
    log = MetricsLog(loop.out / METRICS_FILE, keep_lines=start, write=ranks.is_main)

    model.train()
    stop = StopFlag(ranks)
    total = loop.total

    def checkpoint_now(done: int, rng: RngState) -> None:
        every = ranks.objects(rng)  # each rank's stream; rank 0 writes them all
        if not ranks.is_main:
            return
        save_checkpoint(
            loop.out,
            adapter_state=trainable_state(model),
            optimizer=optimizer,
            scheduler=scheduler,
            rng=rng,
            state=TrainState(opt_steps_done=done, optimizer=type(optimizer).__name__),
            scaler=scaler,
            other_ranks=every[1:],
        )

    def interrupted(when: str, step: int) -> RunInterrupted:
        return RunInterrupted(
            f"{stop.signal or 'a signal to another rank'}: {loop.name} stopped {when} optimiser step {step}/{total}; "
            f"checkpoint saved in {loop.out / CHECKPOINT_DIR}; continue with --resume"
        )

    with stop.installed(), loop.reporter.task(loop.task, total=total) as advance:
        advance(start)
        for k in range(start, total):
            boundary = RngState.capture()
            try:
                row = window(model, k, stop, scaler.scale if scaler else identity)
            except WindowStopped:
                checkpoint_now(k, boundary)
                raise interrupted("before", k + 1) from None
            row["lr"] = optimizer.param_groups[0]["lr"]
            ranks.sum_grads_(params)  # each rank's loss was already scaled by the global window
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
            if loop.evaluate is not None and due(k + 1, total, loop.eval_every):
                row |= loop.evaluate(model)
                model.train()
            log.append(row)
            advance(1, **loop.shown(row))
            done = k + 1
            saved = done % cfg.save_every == 0 and done < total
            if saved:
                checkpoint_now(done, RngState.capture())
            for callback in loop.callbacks:
                callback(row)
            if stop.at_boundary() and done < total:
                if not saved:
                    checkpoint_now(done, RngState.capture())
                raise interrupted("after", done)
    return log.rows


def _restore(
    model: nn.Module, loop: Loop, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> int | None:
    """Loads loop.out's checkpoint into the model, optimiser, schedule, scaler and RNG; returns the optimiser
    steps it had done, or None when there is no checkpoint."""
    checkpoint = load_checkpoint(loop.out)
    if checkpoint is None:
        return None
    from peft import set_peft_model_state_dict

    _check_optimizer(checkpoint.state.optimizer, optimizer, loop)
    set_peft_model_state_dict(model, checkpoint.adapter)
    optimizer.load_state_dict(checkpoint.optimizer)
    scheduler.load_state_dict(checkpoint.scheduler)
    if scaler is not None and checkpoint.scaler is not None:
        scaler.load_state_dict(checkpoint.scaler)
    start = checkpoint.state.opt_steps_done
    rng = checkpoint.rng_for(loop.ranks.rank)
    if rng is not None:
        rng.restore()
    else:  # resumed on more ranks than saved it: this rank's stream starts afresh
        torch.manual_seed(loop.ranks.seed(loop.seed + start))
    loop.reporter.note(f"{loop.name}: resuming at optimiser step {start + 1}/{loop.total}")
    return start


def _check_optimizer(saved: str, optimizer: torch.optim.Optimizer, loop: Loop) -> None:
    """Another optimiser class cannot load this state (torch AdamW state into bitsandbytes' 8-bit AdamW fails
    only at its first step, with a KeyError): refuse it in one line instead."""
    now = type(optimizer).__name__
    if saved and saved != now:
        raise InputError(
            f"--resume: {loop.name}'s checkpoint holds {saved} state, this run would use {now} "
            f"(--optim {loop.config.optim} on {loop.hw.device.type}); resume with the optimiser it was started with"
        )
