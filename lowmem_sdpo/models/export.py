"""Export S + dW_1 + ... + dW_T as a bf16 Hugging Face checkpoint, one shard at a time.

Peak memory is one source shard plus its merged copy, whatever the model size, and three float64 copies of one
adapted tensor (the sum, then the trained and the written change that DeltaKept compares). Deltas are formed in
float64 on the CPU (cheap there: r is small), so the only rounding is the final cast to `dtype`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_sdpo.atomic import atomic_dir
from lowmem_sdpo.checks import check_replaceable_dir, write_marker
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.adapters import LoraFactor, check_against_checkpoint, load_all_factors
from lowmem_sdpo.models.checkpoint import INDEX_FILE, Checkpoint
from lowmem_sdpo.models.merge import Progress

# The files a tokenizer (and its chat template) is loaded from, whichever a model directory has.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Copied verbatim next to the weights (whichever exist).
SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES)
# The marker kind of an exported checkpoint: only a directory holding it may be replaced by a new export.
EXPORT_KIND = "export"
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def _deltas_by_key(
    checkpoint: Checkpoint, factors: list[dict[str, LoraFactor]]
) -> dict[str, list[LoraFactor]]:
    """checkpoint tensor key -> the LoRA factors to add to it, in adapter order."""
    by_key: dict[str, list[LoraFactor]] = {}
    for per_adapter in factors:
        for name, factor in per_adapter.items():
            by_key.setdefault(checkpoint.key_for(name), []).append(factor)
    return by_key


@dataclass
class DeltaKept:
    """How much of what training changed a checkpoint carries, over every merged tensor: the written change
    (cast(S + sum dW) - cast(S), both in the export's dtype) projected on the trained change sum dW, as a
    fraction of it. 1 in float32. In bf16 an update under half a bf16 step of its weight rounds away whole: on
    SmolLM2 a 2-step run of 4 optimiser steps at lr 5e-6 kept 0.4%; scaled to what ~800 steps reach (a mean |dW|
    of 1% of an NF4 step) 96.2%, and all of it from 5% of a step on (README "Export")."""

    trained_sq: float = 0.0  # |sum dW|^2
    kept_dot: float = 0.0  # <written change, sum dW>

    def add(self, trained: torch.Tensor, written: torch.Tensor) -> None:
        trained, written = trained.reshape(-1), written.reshape(-1)  # dot products: no product temporaries
        self.trained_sq += float(torch.dot(trained, trained))
        self.kept_dot += float(torch.dot(written, trained))

    @property
    def fraction(self) -> float | None:
        """None when nothing was trained (every adapter zero)."""
        return self.kept_dot / self.trained_sq if self.trained_sq > 0 else None


def _merge_tensor(
    key: str, tensor: torch.Tensor, factors: list[LoraFactor], dtype: torch.dtype, kept: DeltaKept
) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor  # integer buffers, if any, are not weights
    if not factors:
        return tensor.to(dtype)
    total = tensor.to(torch.float64)
    for factor in factors:
        delta = factor.delta(torch.float64)
        if tuple(delta.shape) != tuple(total.shape):
            raise InputError(
                f"adapter delta for '{key}' has shape {tuple(delta.shape)}, the model's is {tuple(total.shape)}"
            )
        total += delta
    merged = total.to(dtype)
    # In place, one float64 temporary at a time: a SOLAR MLP weight is 470 MB in float64.
    trained = total.sub_(tensor.to(torch.float64))
    written = merged.to(torch.float64).sub_(tensor.to(dtype).to(torch.float64))
    kept.add(trained, written)
    return merged


def _write_config(src: Path, dst: Path, dtype: torch.dtype) -> None:
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    name = DTYPE_NAMES[dtype]
    config["torch_dtype"] = name  # transformers 4.x reads torch_dtype, 5.x dtype: write both
    config["dtype"] = name
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_merged(
    model_dir: Path,
    adapters: Sequence[Path],
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: Progress | None = None,
    kept: DeltaKept | None = None,
) -> Path:
    """Write S + sum dW to `out_dir`, keeping S's sharding; returns out_dir. `out_dir` must be new, empty, or an
    earlier export (its marker file says so): anything else there is refused, never replaced. The write is
    atomic (a temp directory beside it, renamed into place). `kept`, when given, is filled with how much of the
    trained change the written checkpoint carries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in DTYPE_NAMES:
        raise InputError(f"export dtype {dtype}: expected one of {', '.join(DTYPE_NAMES.values())}")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"model {model_dir}: no config.json")
    check_replaceable_dir("export to", out_dir, EXPORT_KIND, keep=(model_dir, *map(Path, adapters)))
    checkpoint = Checkpoint(model_dir)
    if checkpoint.is_prequantized():
        raise InputError(f"model {model_dir} is stored in 4 bit; export needs its full-precision weights")
    factors = load_all_factors([Path(a) for a in adapters])
    check_against_checkpoint(factors, checkpoint)  # fail before anything is written
    by_key = _deltas_by_key(checkpoint, factors)
    kept = DeltaKept() if kept is None else kept

    with atomic_dir(out_dir) as tmp:
        weight_map: dict[str, str] = {}
        total_size = 0
        if progress:
            progress("exporting merged model", 0, len(checkpoint.files))
        for i, name in enumerate(checkpoint.files):
            merged: dict[str, torch.Tensor] = {}
            with safe_open(str(model_dir / name), framework="pt") as f:
                for key in f.keys():  # safe_open is not a dict: keys() is its API
                    merged[key] = _merge_tensor(
                        key, f.get_tensor(key), by_key.get(key, []), dtype, kept
                    ).contiguous()
            save_file(merged, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(merged, name))
            total_size += sum(t.numel() * t.element_size() for t in merged.values())
            del merged
            if progress:
                progress("exporting merged model", i + 1, len(checkpoint.files))
        if len(checkpoint.files) > 1 or (model_dir / INDEX_FILE).is_file():
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _write_config(model_dir, tmp, dtype)
        for side in SIDE_FILES:
            if (model_dir / side).is_file():
                shutil.copyfile(model_dir / side, tmp / side)
        write_marker(tmp, EXPORT_KIND)
    return out_dir
