"""Optimisers (a registry) and the cosine-with-warm-up schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from lowmem_sdpo.errors import InputError

Params = Iterable[torch.nn.Parameter]


def _torch_adamw(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _paged(bits: int) -> Callable[[Params, float, float], torch.optim.Optimizer]:
    def make(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        # Paged: optimiser state lives in unified memory and is evicted to CPU RAM under GPU pressure
        # instead of failing with OOM; 8-bit: 2 bytes of state per parameter instead of 8.
        cls = bnb.optim.PagedAdamW8bit if bits == 8 else bnb.optim.PagedAdamW32bit
        return cls(params, lr=lr, weight_decay=weight_decay)

    return make


OPTIMIZERS: dict[str, Callable[[Params, float, float], torch.optim.Optimizer]] = {
    "adamw": _torch_adamw,
    "paged_adamw_8bit": _paged(8),
    "paged_adamw_32bit": _paged(32),
}
CUDA_ONLY = frozenset({"paged_adamw_8bit", "paged_adamw_32bit"})


def resolve_optimizer(name: str, on_cuda: bool) -> str:
    if name == "auto":
        return "paged_adamw_8bit" if on_cuda else "adamw"
    if name in CUDA_ONLY and not on_cuda:
        raise InputError(f"--optim {name}: paged optimisers need CUDA; use --optim adamw (or auto) on CPU")
    return name


def make_optimizer(name: str, params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params, lr, weight_decay)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ceil(ratio * total) steps, then cosine decay to 0 at `total_steps`.

    Optimiser step k (1-based) runs at lr * factor(k - 1). Unlike transformers' schedule, whose first step
    has lr 0 (a wasted step), warm-up step k runs at lr * k / warmup.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
