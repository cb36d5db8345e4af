"""Small checkpoints and adapters for the models tests (a plain module: tests import these helpers).

The Llama here is random, 2 layers, hidden 64: block linear shapes are multiples of 64 (bitsandbytes' NF4
block size), so everything the real models do happens, in milliseconds. The LoRA reference math
(`reference_deltas`) is written out here from the safetensors file and peft's documented scaling
(alpha / r), independently of lowmem_sdpo.models.adapters.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir
from lowmem_sdpo.models import QuantSettings, add_lora

CPU_QUANT = QuantSettings(compute_dtype="float32")
PEFT_PREFIX = "base_model.model."
# The decoder-block linears of a Llama, named independently of lowmem_sdpo.models.blocks.
BLOCK_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def tokenizer_vocab_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundled_tokenizer_dir() / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def write_llama(
    path: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    hidden: int = 64,
    max_shard_size: str | None = None,
    with_tokenizer: bool = False,
) -> Path:
    """A random Llama saved with save_pretrained (optionally sharded, optionally with the bundled tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tokenizer_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Non-trivial norm weights, so a mixed-up norm would show in outputs.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.data = 1 + 0.1 * torch.randn_like(param)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kwargs)
    if with_tokenizer:
        for file in bundled_tokenizer_dir().glob("*.json"):
            shutil.copyfile(file, Path(path) / file.name)
    return Path(path)


def load_fp32(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def write_adapter(model_dir: Path, path: Path, *, seed: int, r: int = 4, alpha: int = 8, scale: float = 0.05) -> Path:
    """A LoRA as if trained: add_lora's seeded A, and B set to seeded random values (a fresh B is 0)."""
    model = add_lora(load_fp32(model_dir), r=r, alpha=alpha, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = scale * torch.randn(param.shape, generator=gen)
    model.save_pretrained(str(path))
    return Path(path)


def reference_deltas(adapter_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """module name -> (alpha / r) * B @ A in `dtype`, straight from adapter_model.safetensors."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[name] = scaling * (b.to(dtype) @ a.to(dtype))
    return deltas


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, in its stored dtype."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def token_batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
