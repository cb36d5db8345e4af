"""Optimisers (a registry of name -> factory), the rule for `--optim auto`, and the cosine-with-warm-up schedule.

`auto` on CUDA is bitsandbytes' non-paged AdamW8bit. The paged variants are selectable but not the default:
bitsandbytes never frees its paged buffers (about 66 MB per sDPO step for SOLAR-10.7B's LoRA, invisible to
torch.cuda.memory_allocated) and synchronises the device after every parameter's update, while LoRA's whole
optimiser state is ~100 MB, so paging it out under memory pressure buys nothing worth that cost.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lowmem_sdpo.errors import InputError

Params = Iterable[torch.nn.Parameter]
Factory = Callable[[Params, float, float], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    make: Factory
    needs_bnb: bool = False
    needs_cuda: bool = False  # refused on CPU, where it would mean nothing (paging) rather than fail


def _torch_adamw(fused: bool) -> Factory:
    def make(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        # fused: one kernel launch for all parameters' updates instead of a few per parameter.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)

    return make


def _bnb(class_name: str) -> Factory:
    def make(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        # 8-bit: 2 bytes of state per parameter instead of 8. Paged: state in unified memory, evicted to
        # CPU RAM under GPU pressure instead of failing with OOM (at the costs in the module docstring).
        return getattr(bnb.optim, class_name)(params, lr=lr, weight_decay=weight_decay)

    return make


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(_torch_adamw(fused=False)),
    "adamw_fused": OptimizerSpec(_torch_adamw(fused=True)),
    "adamw_8bit": OptimizerSpec(_bnb("AdamW8bit"), needs_bnb=True),
    "paged_adamw_8bit": OptimizerSpec(_bnb("PagedAdamW8bit"), needs_bnb=True, needs_cuda=True),
    "paged_adamw_32bit": OptimizerSpec(_bnb("PagedAdamW32bit"), needs_bnb=True, needs_cuda=True),
}
# `--optim auto`, by (on CUDA, bitsandbytes importable). CPU keeps plain torch AdamW, whose results the CPU
# tests and the demo were checked with.
AUTO: dict[tuple[bool, bool], str] = {
    (True, True): "adamw_8bit",
    (True, False): "adamw_fused",
    (False, True): "adamw",
    (False, False): "adamw",
}


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_optimizer(name: str, on_cuda: bool, bnb_available: bool | None = None) -> str:
    """`--optim` -> a key of OPTIMIZERS; `bnb_available` defaults to whether bitsandbytes is installed."""
    bnb = has_bitsandbytes() if bnb_available is None else bnb_available
    if name == "auto":
        return AUTO[(on_cuda, bnb)]
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise InputError(f"--optim {name}: expected one of auto, {', '.join(OPTIMIZERS)}")
    if spec.needs_cuda and not on_cuda:
        raise InputError(f"--optim {name}: paged optimisers need CUDA; use --optim adamw (or auto) on CPU")
    if spec.needs_bnb and not bnb:
        raise InputError(f"--optim {name}: bitsandbytes is not installed; use --optim adamw (or auto)")
    return name


def make_optimizer(name: str, params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name].make(params, lr, weight_decay)


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
