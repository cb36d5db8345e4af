"""The run settings that every CPU run of a tiny model on an addition toy shares: `lowmem-sdpo demo`, the
self-reward demo and benchmarks/bench_sdpo_vs_dpo.py (and the toy scorer's tokenisation limits). What each of
them tunes for itself (beta, learning rate, epochs, batch size, save interval) stays with it."""

from __future__ import annotations

from typing import Any

TINY_TOY_RUN: dict[str, Any] = {
    # The addition toys' sequences (chat template, "a+b=", an answer of at most 3 digits) are ~20 tokens.
    "max_length": 32,
    "max_prompt_length": 24,
    "grad_accum": 1,
    "warmup_ratio": 0.1,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "device": "cpu",
    "gradient_checkpointing": False,  # a 2-layer model has no activations worth recomputing
}
