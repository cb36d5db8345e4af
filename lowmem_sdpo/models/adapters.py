"""Reading peft LoRA adapter directories into per-module weight deltas dW = scaling * B @ A.

Factors stay low-rank in memory (a 10.7B model's r=16 adapter is ~60 MB); a dense delta is formed only for
the one module being merged at that moment.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.checkpoint import Checkpoint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# peft key part -> (which factor, whether the delta is transposed: embeddings store A as [r, vocab])
FACTOR_KEYS: dict[str, tuple[str, bool]] = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}
# Adapter features whose effect is not scaling * B @ A: refuse them rather than merge something else.
UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA bias terms (lora_bias=true)",
    "modules_to_save": "modules_to_save (fully trained module copies)",
    "trainable_token_indices": "trainable token indices",
}


@dataclass
class LoraFactor:
    """One module's LoRA: dW = scaling * B @ A ([out, in]); transposed for embeddings / fan_in_fan_out."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of dW (and so of the weight it is added to)."""
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def delta(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        a = self.A.to(device=device, dtype=dtype)
        b = self.B.to(device=device, dtype=dtype)
        d = (b @ a) * self.scaling
        return d.T if self.transpose else d


def _pattern_value(patterns: dict[str, int | float], module: str, default: float) -> float:
    """peft's rank/alpha_pattern rule: a key matches a module name ending in that (regex) key."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"adapter {adapter_dir}: no {CONFIG_FILE} (expected a peft adapter directory)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise InputError(f"{path}: {what} cannot be merged; train a plain LoRA adapter")
    return config


def load_lora_factors(adapter_dir: Path) -> dict[str, LoraFactor]:
    """module name (as in the base model, e.g. 'model.layers.0.self_attn.q_proj') -> its LoRA factors."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InputError(f"adapter {adapter_dir}: no {WEIGHTS_FILE}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    transposed: dict[str, bool] = {}
    for key, tensor in load_file(str(weights_path)).items():
        suffix = next((s for s in FACTOR_KEYS if key.endswith("." + s)), None)
        if suffix is None:
            raise InputError(f"{weights_path}: unexpected tensor '{key}' (expected LoRA A/B factors only)")
        name = key[: -len(suffix) - 1].removeprefix(PEFT_PREFIX)
        which, transpose = FACTOR_KEYS[suffix]
        parts.setdefault(name, {})[which] = tensor
        transposed[name] = transpose or bool(config.get("fan_in_fan_out"))

    factors: dict[str, LoraFactor] = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise InputError(f"{weights_path}: module '{name}' has only LoRA factor {sorted(ab)}")
        _check_factor_shapes(weights_path, name, ab["A"], ab["B"])
        rank = ab["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, float(config.get("lora_alpha", rank)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[name] = LoraFactor(ab["A"], ab["B"], scaling, transposed[name])
    return factors


def _check_factor_shapes(path: Path, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    # Without this an inconsistent adapter fails deep inside a matmul with a RuntimeError.
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InputError(
            f"{path}: module '{name}' has LoRA factors A {tuple(a.shape)} and B {tuple(b.shape)}; "
            "expected A [r, in] and B [out, r] with the same rank r"
        )


def check_against_checkpoint(factors: Sequence[dict[str, LoraFactor]], checkpoint: Checkpoint) -> None:
    """Every adapted module exists in the checkpoint with dW's shape (read from the safetensors headers, so
    a wrong adapter fails before a slow load or a half-written export)."""
    for per_adapter in factors:
        for name, factor in per_adapter.items():
            shape = checkpoint.shape(checkpoint.key_for(name))
            if shape != factor.shape:
                raise InputError(
                    f"adapter module '{name}': delta shape {factor.shape} does not match the model's {shape} "
                    "(adapter trained on a different model?)"
                )


def load_all_factors(adapters: Sequence[Path]) -> list[dict[str, LoraFactor]]:
    return [load_lora_factors(Path(a)) for a in adapters]


def adapter_deltas(adapter_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name as in the base model, fp32 dW) for every module the adapter touches, in name order."""
    for name, factor in load_lora_factors(adapter_dir).items():
        yield name, factor.delta(torch.float32)
