"""Materialising M_t from S and the adapters of steps 1..t, in one of two ways (MERGES registry).

exact   (default): M_t = quantise(S + dW_1 + ... + dW_t). S's full-precision weight is re-read tensor by
        tensor from its safetensors, the deltas are added in fp32 (in adapter order: ((S + dW_1) + dW_2) ...),
        the sum is rounded once to the checkpoint's dtype and quantised once. Quantisation error therefore
        never compounds from step to step: M_t is as close to S + sum dW as one NF4 rounding allows.
inplace: for bases that exist only in 4 bit: M_t = quantise(dequantise(M_{t-1}) + dW_t), applied adapter by
        adapter, so each step adds one more rounding (the "quality loss when merging into 4-bit" users hit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.adapters import LoraFactor
from lowmem_sdpo.models.checkpoint import Checkpoint
from lowmem_sdpo.models.quant import (
    QuantSettings,
    dequantize_weight,
    is_linear4bit,
    quantize_weight,
    requantize_like,
    set_4bit_weight,
)

# progress(description, done, total): called with done = 0 before the first unit of work, so that a bar's clock
# (runtime/reporting.merge_progress opens one on the first call) covers all of it, then after each unit.
Progress = Callable[[str, int, int], None]
Factors = Sequence[dict[str, LoraFactor]]


def _module(modules: dict[str, nn.Module], name: str, where: str) -> nn.Module:
    module = modules.get(name)
    if module is None or getattr(module, "weight", None) is None:
        raise InputError(f"{where}: module '{name}' is not a weight-bearing module of this model")
    return module


def _check_shape(delta: torch.Tensor, shape: torch.Size, name: str) -> None:
    if tuple(delta.shape) != tuple(shape):
        raise InputError(
            f"adapter module '{name}': delta shape {tuple(delta.shape)} does not match the model's {tuple(shape)} "
            "(adapter trained on a different model?)"
        )


def _set_dense(module: nn.Module, weight: torch.Tensor) -> None:
    """Non-quantised targets (lm_head, embeddings): keep the module's dtype and device."""
    old = module.weight
    module.weight = nn.Parameter(weight.to(device=old.device, dtype=old.dtype), requires_grad=False)


def merge_exact(
    model: nn.Module,
    checkpoint: Checkpoint,
    factors: Factors,
    quant: QuantSettings,
    device: str | torch.device,
    progress: Progress | None = None,
) -> None:
    modules = dict(model.named_modules())
    names = sorted({name for per_adapter in factors for name in per_adapter})
    if progress:
        progress("merging adapters (exact)", 0, len(names))
    for i, name in enumerate(names):
        module = _module(modules, name, "exact merge")
        base = checkpoint.read(checkpoint.key_for(name), device)
        total = base.to(torch.float32)
        for per_adapter in factors:
            if name in per_adapter:
                delta = per_adapter[name].delta(torch.float32, device)
                _check_shape(delta, total.shape, name)
                total += delta
        merged = total.to(base.dtype)  # one rounding to the checkpoint's precision ...
        del base, total
        if is_linear4bit(module):
            set_4bit_weight(module, quantize_weight(merged, quant, device))  # ... and one quantisation
        else:
            _set_dense(module, merged)
        if progress:
            progress("merging adapters (exact)", i + 1, len(names))


def merge_inplace(
    model: nn.Module,
    checkpoint: Checkpoint,
    factors: Factors,
    quant: QuantSettings,
    device: str | torch.device,
    progress: Progress | None = None,
) -> None:
    modules = dict(model.named_modules())
    total_steps = sum(len(f) for f in factors)
    done = 0
    if progress:
        progress("merging adapters (inplace)", 0, total_steps)
    for per_adapter in factors:
        for name, factor in per_adapter.items():
            module = _module(modules, name, "inplace merge")
            old = module.weight
            dense = dequantize_weight(old) if is_linear4bit(module) else old.detach()
            delta = factor.delta(torch.float32, dense.device)
            _check_shape(delta, dense.shape, name)
            summed = dense.to(torch.float32) + delta
            if is_linear4bit(module):
                set_4bit_weight(module, requantize_like(old, summed))
            else:
                _set_dense(module, summed)
            done += 1
            if progress:
                progress("merging adapters (inplace)", done, total_steps)


MergeFn = Callable[[nn.Module, Checkpoint, Factors, QuantSettings, Any, Any], None]
MERGES: dict[str, MergeFn] = {"exact": merge_exact, "inplace": merge_inplace}
