"""SFT's window for the shared training loop (engine/training/loop.py): one optimiser step's micro-batches of
examples, each rank running its part of each, every part's loss divided by the answer tokens of the whole
global window (sft/loss.py), so the gradients summed over micro-batches and ranks are the window mean's."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.data import TokenizedExample
from lowmem_sdpo.engine.training.checkpoint import CHECKPOINT_DIR
from lowmem_sdpo.engine.training.loop import FiniteWatch, Scale, StopFlag
from lowmem_sdpo.engine.training.schedule import Schedule
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.sft.loss import answer_tokens, collate_examples, sft_loss_part


@dataclass
class SftWindow:
    """The loop's WindowFn for SFT: window(model, k, stop, scale) -> the metrics row of optimiser step k."""

    examples: list[TokenizedExample]
    schedule: Schedule  # global micro-batches of example indices
    pad_id: int
    hw: Hardware
    impl: str
    train_dir: Path  # named in the non-finite-loss message (its checkpoint is the last good state)
    ranks: Ranks = SINGLE

    def __call__(self, model: nn.Module, k: int, stop: StopFlag, scale: Scale) -> dict[str, Any]:
        started = time.perf_counter()
        micro = self.schedule[k]
        # Every rank holds every example: each computes the global window's answer tokens itself.
        window_tokens = sum(answer_tokens([self.examples[i] for i in mb]) for mb in micro)
        watch = FiniteWatch()
        losses: list[torch.Tensor] = []
        seen = 0  # tokens this rank ran (prompt and answer), for tokens per second
        for m, mb in enumerate(micro):
            mine = self.ranks.shard(mb)
            if not mine:  # a short last micro-batch left this rank nothing
                continue
            batch = collate_examples([self.examples[i] for i in mine], self.pad_id)
            loss, _ = sft_loss_part(model, batch, window_tokens, hw=self.hw, impl=self.impl)
            watch.add(loss, m, mine)
            scale(loss).backward()
            losses.append(loss.detach())
            seen += int(batch["attention_mask"].sum())  # the CPU batch: no device sync
            stop.poll()
        device = self.hw.device
        local = (
            torch.stack(losses).double().sum()
            if losses
            else torch.zeros((), dtype=torch.float64, device=device)
        )
        # The window's one device->host copy: its loss, its tokens and its count of non-finite losses, summed
        # over ranks (so that every rank stops together on a bad loss).
        figures = torch.stack(
            [
                local.to(device),
                torch.tensor(float(seen), dtype=torch.float64, device=device),
                watch.bad(device),
            ]
        )
        loss_sum, all_seen, bad = self.ranks.sum_(figures).tolist()
        watch.raise_if_bad(bad, self._describe(k), self._elsewhere(k))
        seconds = time.perf_counter() - started
        return {
            "opt_step": k + 1,
            "loss": loss_sum,
            "answer_tokens": window_tokens,
            "tokens_per_second": all_seen / max(seconds, 1e-9),
            "seconds": seconds,
        }

    def _last_good(self) -> str:
        return f"the last checkpoint in {self.train_dir / CHECKPOINT_DIR} (if any) is the last good state"

    def _describe(self, k: int):  # -> loop.Describe
        def describe(what: str, m: int, indices: list[int]) -> str:
            return (
                f"{what} loss in SFT at optimiser step {k + 1}, micro-batch {m + 1} (examples {indices[:8]}"
                f"{'...' if len(indices) > 8 else ''}); the optimiser step was not taken and {self._last_good()}; "
                "try a lower --learning-rate"
            )

        return describe

    def _elsewhere(self, k: int) -> str:
        return (
            f"non-finite loss on another rank in SFT at optimiser step {k + 1}; the optimiser step was not taken; "
            f"{self._last_good()}"
        )
