"""The SFT objective: minus the mean log-prob of the answer tokens (prompt and padding masked), the mean
taken over every answer token of the optimiser step's window, as transformers' causal-LM loss does for one
batch. Log-probs come from the fused lm-head kernel (runtime.logprobs), so no [tokens, vocab] logits exist."""

from __future__ import annotations

import torch
from torch import nn

from lowmem_sdpo.data import TokenizedExample, pad_rows
from lowmem_sdpo.engine.units import shift_labels
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.logprobs import batch_logprobs


def collate_examples(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T]; labels already shifted for the kernel (position t scores token t + 1)."""
    batch = pad_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    batch["labels"] = shift_labels(batch["labels"])
    return batch


def answer_tokens(examples: list[TokenizedExample]) -> int:
    return sum(len(e.completion_ids) for e in examples)


def sft_loss_part(
    model: nn.Module, batch: dict[str, torch.Tensor], window_tokens: int, *, hw: Hardware, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the window loss, -sum(answer log-probs) / window_tokens (summed over a
    window's micro-batches it is the window's mean), and its summed log-probs per row (detached)."""
    logp, _ = batch_logprobs(model, batch, hw=hw, impl=impl)
    return -logp.sum() / window_tokens, logp.detach()
