"""The sampling model: S in 4 bit (loaded once) with an adapter chain attached as a frozen delta, the
engine's ExactHolder, so M_{t-1} samples exactly as step t-1 trained it, with no merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_sdpo.data import load_tokenizer
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.models import resolve_model
from lowmem_sdpo.runtime.hardware import Hardware, resolve_hardware
from lowmem_sdpo.runtime.materialise import Holder
from lowmem_sdpo.runtime.open_model import open_model
from lowmem_sdpo.runtime.reporting import Reporter


@dataclass
class Sampler:
    model_dir: Path
    tokenizer: Any
    hw: Hardware
    holder: Holder  # exact

    def model_for(self, chain: list[Path]) -> Any:
        return self.holder.model_for(chain)

    def release(self) -> None:
        self.holder.release()


def open_sampler(model: str, config: RunConfig, reporter: Reporter, revision: str | None = None) -> Sampler:
    """`config` supplies the device, compute dtype and double quantisation (the run's own settings)."""
    hw = resolve_hardware(config)
    model_dir = resolve_model(model, revision)
    tokenizer = load_tokenizer(str(model_dir))
    model = open_model(model_dir, hw, double_quant=config.double_quant, reporter=reporter, purpose="for sampling")
    return Sampler(model_dir, tokenizer, hw, model.holder)
