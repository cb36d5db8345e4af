"""Which modules are "the linears of the decoder blocks" (the ones held in 4 bit and given LoRA)."""

from __future__ import annotations

import torch
from torch import nn


def decoder_block_lists(model: nn.Module) -> list[str]:
    """Qualified names of the ModuleLists that hold the decoder blocks (`model.layers` for Llama).

    Recognised by length: a ModuleList with exactly config.num_hidden_layers entries. This works for every
    decoder-only architecture transformers ships (layers / h / blocks) without naming them one by one.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (n_layers is None or len(module) == n_layers)
    ]
    # Keep the outermost lists only (a block may itself hold a ModuleList of experts of the same length).
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def _is_linear(module: nn.Module) -> bool:
    from lowmem_sdpo.models.quant import is_linear4bit

    return isinstance(module, nn.Linear) or is_linear4bit(module)


def block_linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear (or Linear4bit) inside a decoder block, by qualified name."""
    lists = decoder_block_lists(model)
    return [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and any(name.startswith(p + ".") for p in lists)
    ]


def other_linear_names(model: nn.Module) -> list[str]:
    """The linears outside the blocks (lm_head, projectors): kept in the compute dtype, never quantised."""
    inside = set(block_linear_names(model))
    return [name for name, module in model.named_modules() if _is_linear(module) and name not in inside]


def meta_skeleton(model_dir: str) -> nn.Module:
    """The architecture of `model_dir` with no memory behind it (to read module names before loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
