"""Per-sequence log-probs of a (peft) causal LM: backbone hidden states -> fused lm-head log-probs.

The model's own forward would return [rows, T, vocab] logits; we call its decoder for the final hidden
states instead and hand them, with the lm-head weight, to `lowmem_sdpo_kernels.sequence_logprobs`, so those
logits never exist (on SOLAR, 4 pairs x 1024 tokens x 32000 vocab in fp32 would be 1 GiB per copy).
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem_sdpo.engine.hardware import Hardware
from lowmem_sdpo_kernels import sequence_logprobs


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def batch_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, hw: Hardware, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [rows] fp32, answer tokens [rows]); `batch["labels"]` already shifted."""
    lm = causal_lm(model)
    device = hw.device
    with hw.autocast():
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).last_hidden_state
    weight = lm.get_output_embeddings().weight
    # The kernel wants hidden and weight in one dtype; under autocast hidden may come out in bf16/fp32.
    return sequence_logprobs(hidden.to(weight.dtype), weight, batch["labels"].to(device), impl=impl)
