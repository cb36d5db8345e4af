"""Reading a Hugging Face safetensors checkpoint tensor by tensor (never the whole model at once)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from lowmem_sdpo.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """The safetensors files of a model directory and which file holds which tensor."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)

    @cached_property
    def files(self) -> list[str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            return sorted(set(self.weight_map.values()))
        names = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        if not names:
            raise InputError(
                f"model {self.model_dir}: no *.safetensors weights (only safetensors are supported)"
            )
        return names

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """tensor name -> file name."""
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as err:
                raise InputError(
                    f"{index}: not a safetensors index (expected a 'weight_map' object)"
                ) from err
        from safetensors import safe_open

        found: dict[str, str] = {}
        for name in self.files:
            with safe_open(str(self.model_dir / name), framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), name))
        return found

    def key_for(self, module_name: str, suffix: str = "weight") -> str:
        """The checkpoint key of `module_name`'s parameter; tolerates a missing/extra 'model.' style prefix."""
        wanted = f"{module_name}.{suffix}"
        if wanted in self.weight_map:
            return wanted
        for key in self.weight_map:  # e.g. saved from the base model ("layers.0...") vs "model.layers.0..."
            if key.endswith("." + wanted) or wanted.endswith("." + key):
                return key
        raise InputError(f"model {self.model_dir}: no tensor '{wanted}' in its safetensors files")

    def read(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, in its stored dtype."""
        from safetensors import safe_open

        with safe_open(str(self.model_dir / self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key).to(device)

    def shape(self, key: str) -> tuple[int, ...]:
        """One tensor's stored shape, from the file header (no data read)."""
        from safetensors import safe_open

        with safe_open(str(self.model_dir / self.weight_map[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def is_prequantized(self) -> bool:
        config = json.loads((self.model_dir / "config.json").read_text())
        return "quantization_config" in config
