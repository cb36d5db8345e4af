"""A fresh LoRA on every linear of the decoder blocks of a (4-bit) model."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lowmem_sdpo.models.blocks import block_linear_names, other_linear_names
from lowmem_sdpo.models.lora_dropout import install_dropout


def add_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.05,
    seed: int | None = None,
    dropout_impl: str = "lanes",
):
    """Wrap `model` in a peft LoRA (B = 0, so outputs are unchanged until the first update).

    Targets: the block linears by leaf name (q/k/v/o/gate/up/down for Llama), with any same-named linear
    outside the blocks excluded; lm_head never. Unlike peft's prepare_model_for_kbit_training this does not
    cast the model to fp32 (on a 10.7B model that is gigabytes); it freezes the base, keeps the LoRA
    factors in fp32 (peft's default) and makes the embedding output require grad, which gradient
    checkpointing of a frozen-input model needs to get gradients to the adapters.

    dropout_impl: a key of lora_dropout.DROPOUT_IMPLS, "lanes" (CPU masks from 64-bit random words, p rounded
    to a multiple of 2^-16; lora_dropout.py) or "torch" (peft's nn.Dropout).
    """
    from peft import LoraConfig, get_peft_model

    inside = block_linear_names(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in inside})
    outside = [n for n in other_linear_names(model) if n.rsplit(".", 1)[-1] in leaves]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=leaves,
        exclude_modules=outside or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.requires_grad_(False)
    # The seed must not disturb the caller's RNG streams (data order, dropout): fork them.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():
            # peft calls transformers' deprecated is_gradient_checkpointing; not ours to fix, not the user's.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    install_dropout(peft_model, dropout_impl)
    if hasattr(peft_model, "enable_input_require_grads"):
        peft_model.enable_input_require_grads()
    return peft_model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing. transformers renamed the method (and its kwargs argument) in the
    5.x series; the GPU image's older transformers has only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
