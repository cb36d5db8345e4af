"""Per-sequence log-probs of a (peft) causal LM: backbone hidden states -> fused lm-head log-probs.

The model's own forward would return [rows, T, vocab] logits; we call its decoder for the final hidden
states instead and hand them, with the lm head (weight, and the bias / logit scale / final softcap some
architectures add, see lowmem_sdpo.models.head), to `lowmem_sdpo_kernels.sequence_logprobs`, so those
logits never exist (on SOLAR, 4 pairs x 1024 tokens x 32000 vocab in fp32 would be 1 GiB per copy).
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem_sdpo.models.head import causal_lm, read_head
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo_kernels import sequence_logprobs, valid_rows

__all__ = ["batch_logprobs", "causal_lm"]


def batch_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, hw: Hardware, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [rows] fp32, answer tokens [rows]); `batch["labels"]` already shifted."""
    lm = causal_lm(model)
    head = read_head(lm)  # load_quantized has verified it against the model's own forward
    device = hw.device
    labels = batch["labels"]
    # Collated labels are on the host: finding (and checking) the labelled rows there, before anything
    # runs on the device, spares the kernel its two device -> host syncs. Labels already on the
    # device keep the kernel's own checked path (rows=None).
    rows = valid_rows(labels, head.weight.shape[0]) if labels.device.type == "cpu" else None
    with hw.autocast():
        hidden = lm.get_decoder()(
            input_ids=to_device(batch["input_ids"], device),
            attention_mask=to_device(batch["attention_mask"], device),
            use_cache=False,
        ).last_hidden_state
    # The kernel wants hidden and weight in one dtype; under autocast hidden may come out in bf16/fp32.
    return sequence_logprobs(
        hidden.to(head.weight.dtype),
        head.weight,
        to_device(labels, device),
        impl=impl,
        rows=None if rows is None else to_device(rows, device),
        **head.kernel_kwargs(),
    )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU copies from pinned memory, queued without waiting (non_blocking): a copy from pageable
    memory makes the host wait for it. The batch tensors are fresh per micro-batch and never reused on the
    host, so the asynchronous copy cannot race a later write."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
