"""Tiny random checkpoints of real architectures, written with save_pretrained (a plain module: tests
import these helpers).

Each is the real transformers class with its real config class, shrunk: hidden 64 (bitsandbytes' NF4 block
size, so load_quantized really quantises the block linears), 2 layers (decoder_block_lists recognises the
blocks by a ModuleList of num_hidden_layers entries, and a 1-entry list would be ambiguous), vocabulary 320
(2.5 Triton vocabulary tiles of 128 at the default config, so the padded last tile is exercised). Weights
are seeded and stored in fp32.

The head of each is made so that ignoring its logit transform is caught at a glance, not by a hair:
  * Gemma-2: final_logit_softcapping 5 with raw logits of std 10 (most of them capped hard);
  * RecurrentGemma: the same through its own attribute, logits_soft_cap;
  * Phi: an lm_head bias of std 1;
  * Cohere: logit_scale 4 (the default is 1/16) on raw logits of std 1;
  * Granite: logits_scaling 8 (divide) on raw logits of std 16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

VOCAB = 320
HIDDEN = 64

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class RealArch:
    """One architecture: transformers' class names, config overrides and how its head is set up."""

    config_class: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    raw_logit_std: float = 1.0  # std of h @ W^T before any transform (h has unit RMS after the final norm)
    bias_std: float | None = None  # lm_head bias (the architecture must have one)
    # The head transform a correct reader must find, as the kernels' keywords.
    expected: Callable[[dict[str, Any]], dict[str, Any]] = lambda config: {}


ARCHS: dict[str, RealArch] = {
    "llama": RealArch("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": RealArch("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": 32}),
    "qwen2": RealArch("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "gemma2": RealArch(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # Tied, as real Gemma is: the lm head weight is the embedding matrix.
        {"head_dim": 16, "final_logit_softcapping": 5.0, "tie_word_embeddings": True, "sliding_window": 32},
        raw_logit_std=10.0,
        expected=lambda c: {"softcap": c["final_logit_softcapping"]},
    ),
    "phi": RealArch(
        "PhiConfig",
        "PhiForCausalLM",
        {"tie_word_embeddings": False},
        raw_logit_std=2.0,
        bias_std=1.0,
    ),
    "cohere": RealArch(
        "CohereConfig",
        "CohereForCausalLM",
        {"logit_scale": 4.0, "tie_word_embeddings": True},
        expected=lambda c: {"logit_scale": c["logit_scale"]},
    ),
    "granite": RealArch(
        "GraniteConfig",
        "GraniteForCausalLM",
        {"logits_scaling": 8.0, "tie_word_embeddings": False},
        raw_logit_std=16.0,
        expected=lambda c: {"logit_scale": 1.0 / c["logits_scaling"]},
    ),
    "recurrent_gemma": RealArch(
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        {
            "head_dim": 16,
            "lru_width": HIDDEN,
            "attention_window_size": 16,
            "block_types": ["recurrent", "attention"],
            "logits_soft_cap": 5.0,
            "tie_word_embeddings": True,
        },
        raw_logit_std=10.0,
        expected=lambda c: {"softcap": c["logits_soft_cap"]},
    ),
}


def available(name: str) -> bool:
    """Whether the installed transformers ships this architecture (Granite is recent)."""
    import transformers

    arch = ARCHS[name]
    return hasattr(transformers, arch.config_class) and hasattr(transformers, arch.model_class)


def build_real_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """The random fp32 model (not saved)."""
    import transformers

    arch = ARCHS[name]
    config = getattr(transformers, arch.config_class)(**{**_COMMON, **arch.config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, arch.model_class)(config).float().eval()
        with torch.no_grad():
            # Non-trivial norm weights, so a mixed-up norm would show in outputs (Gemma adds 1 itself).
            for pname, param in model.named_parameters():
                if "norm" in pname and pname.endswith("weight"):
                    param.copy_(param + 0.1 * torch.randn_like(param))
            head = model.get_output_embeddings()
            # h has about unit RMS after the final norm, so a weight of std s / sqrt(D) gives logits of std s.
            head.weight.normal_(std=arch.raw_logit_std / HIDDEN**0.5)
            if arch.bias_std is not None:
                head.bias.normal_(std=arch.bias_std)
    return model


def write_real_model(name: str, path: Path, *, seed: int = 0) -> Path:
    """build_real_model(name) saved with save_pretrained (safetensors, fp32) into `path`."""
    path = Path(path)
    build_real_model(name, seed=seed).save_pretrained(str(path))
    return path


def expected_head(name: str, model_dir: Path) -> dict[str, Any]:
    """The logit transform the architecture's own forward applies, from the saved config.json, as the
    kernels' keywords (independent of lowmem_sdpo.models.head)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return ARCHS[name].expected(config)
