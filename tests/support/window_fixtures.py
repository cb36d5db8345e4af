"""One optimiser window of the tiny model, for the tests of `accumulate_window` (tests/unit/engine/test_engine_losses.py in
one process, tests/support/distributed_fixtures.py across ranks): 8 toy pairs, their reference table, a policy away
from that reference, a StepJob for accumulate_window alone, and the gradients a window leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.reference.logps import LogpTable, compute_logps
from lowmem_sdpo.engine.training.loop import StopFlag
from lowmem_sdpo.engine.training.objective import Objective
from lowmem_sdpo.engine.training.trainer import StepJob, accumulate_window
from lowmem_sdpo.engine.units import Unit, build_units
from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized, resolve_model
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.reporting import Reporter
from tests.support.engine_fixtures import small_config, toy_slice

CPU = Hardware(torch.device("cpu"), "float32")
WindowSetup = tuple[Any, list[Unit], LogpTable, torch.nn.Module]


def window_setup(tmp: Path, ranks: Ranks = SINGLE, dropout: float = 0.0) -> WindowSetup:
    """(tokenizer, units, reference table with KL rows, policy away from the reference): the same on every
    rank; `dropout` is the LoRA dropout (0: every pass of a unit gives the same log-probs)."""
    model_dir = resolve_model("tiny")
    tokenizer = load_tokenizer(str(model_dir))
    step = load_steps(str(toy_slice(tmp / f"w{ranks.rank}.jsonl", 2, 8)))[0]
    units, _ = build_units(tokenize_step(step, tokenizer, max_length=32, max_prompt_length=24), seed=0, label="w")
    model = load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))
    reference = compute_logps(
        model,
        units,
        pad_id=tokenizer.pad_token_id,
        batch_size=2,
        hw=CPU,
        impl="torch",
        with_kl=True,  # KTO's KL point needs them; the other objectives ignore them
        reporter=Reporter(True),
        description="reference",
        ranks=ranks,
    )
    policy = add_lora(model, r=4, alpha=8, dropout=dropout, seed=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # a policy away from the reference, so the sort is not of ties
                p.copy_(torch.randn(p.shape, generator=generator) * 2.0)
    return tokenizer, units, reference, policy


def window_job(tmp: Path, setup: WindowSetup, objective: Objective, ranks: Ranks = SINGLE) -> StepJob:
    """A job for accumulate_window alone: no schedule, no run directory beyond tmp."""
    tokenizer, units, reference, _ = setup
    return StepJob(
        t=1,
        step_dir=tmp,
        units=units,
        reference=reference,
        schedule=[],
        objective=objective,
        config=small_config(tmp),
        hw=CPU,
        impl="torch",
        pad_id=tokenizer.pad_token_id,
        reporter=Reporter(True),
        seed=0,
        ranks=ranks,
    )


def accumulated_grads(
    policy: torch.nn.Module, job: StepJob, micro: list[list[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the gradients of one window of micro-batches, summed over the job's ranks: what the optimiser step
    sees; the window's metrics row)."""
    policy.zero_grad(set_to_none=True)
    policy.train()
    row = accumulate_window(policy, job, 0, micro, StopFlag(job.ranks))
    job.ranks.sum_grads_([p for p in policy.parameters() if p.requires_grad])
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}, row
