"""Which model is in memory: M_{t-1} for the reference pass, the target's base for training (REFERENCE_MODES).

exact (default): Q(S) is loaded and quantised once per run. M_{t-1} is Q(S) plus the finished steps' adapters
    as one frozen low-rank delta (models/frozen_delta.py): exactly the P_{t-1} that step t-1 trained. Switching
    between S, M_{t-1} and the target's base only swaps forward hooks; nothing is reloaded or requantised.
requantized: M_{t-1} = quantise(S + sum dW) (or the inplace merge), loaded per step. It re-rolls the NF4
    rounding, which at real learning rates exceeds what training moved; kept as an option, and its step
    summaries report `reference_drift` (see drift_model).

Either way there is one model in memory at a time: a holder drops its model before it loads another.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.models import QuantSettings, load_quantized
from lowmem_sdpo.models.adapters import load_all_factors
from lowmem_sdpo.models.frozen_delta import FrozenDelta

Loader = Callable[[Sequence[Path], str], nn.Module]  # (adapters to merge, merge mode) -> 4-bit model


def release_memory() -> None:
    """Return freed model memory to the system / the CUDA allocator. Callers drop their references first:
    a reference passed in here would keep the model alive through the collection."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unwrap_policy(policy: nn.Module) -> nn.Module:
    """The plain model back from a peft-wrapped policy: LoRA layers removed (not merged), the input-grad hook
    that add_lora installed removed, so the model is as it was before add_lora."""
    model = policy.base_model.unload() if hasattr(policy, "base_model") else policy
    if hasattr(model, "disable_input_require_grads") and getattr(model, "_require_grads_hook", None):
        model.disable_input_require_grads()
    model.eval()
    return model


class ExactHolder:
    """Q(S) once; S + chain by attaching the chain's factors as a frozen delta."""

    def __init__(self, loader: Loader, quant: QuantSettings, device: torch.device) -> None:
        self._loader = loader
        self._dtype = quant.torch_compute_dtype
        self._device = device
        self._model: nn.Module | None = None
        self._delta: FrozenDelta | None = None
        self._chain: list[Path] | None = None

    def model_for(self, chain: Sequence[Path]) -> nn.Module:
        """The plain model whose forward is Q(S) + the adapters of `chain`."""
        chain = [Path(p) for p in chain]
        if self._model is None:
            self._model = self._loader([], "exact")
        if chain != self._chain:
            if self._delta is not None:
                self._delta.detach()
            self._delta = None
            if chain:
                self._delta = FrozenDelta.from_factors(load_all_factors(chain), self._dtype, self._device)
                self._delta.attach(self._model)
            self._chain = chain
        return self._model

    def drift_model(self, chain: Sequence[Path]) -> nn.Module | None:
        return None  # the reference is P_{t-1} itself: no drift to measure

    def delta_parameters(self) -> int:
        return self._delta.numel() if self._delta is not None else 0

    def release(self) -> None:
        if self._delta is not None:
            self._delta.detach()
        self._model = self._delta = self._chain = None
        release_memory()


class RequantizedHolder:
    """quantise(S + chain) per chain, loaded when the chain changes, and the trained P_{t-1} for the drift sample.

    P_{t-1} is step t-1's training base, quantise(S + chain[:-1]), plus step t-1's adapter as a frozen delta. That
    base is the model step t-1 trained on (target-init previous), still loaded when step t starts: training only
    added LoRA layers, and unwrap_policy took them off again, so it is reused rather than loaded and quantised
    anew. Taking the delta off again gives that base back (step 2's S, for --diagnostics' pass of S). A load
    saved is a 10.7B model read and quantised: minutes."""

    def __init__(self, loader: Loader, merge: str, quant: QuantSettings, device: torch.device) -> None:
        self._loader = loader
        self._merge = merge
        self._dtype = quant.torch_compute_dtype  # of drift_model's delta
        self._device = device
        self._model: nn.Module | None = None
        self._chain: tuple[Path, ...] | None = None  # the model is quantise(S + chain) ...
        self._delta: FrozenDelta | None = None  # ... plus this delta, when it is a drift model

    def _base_for(self, chain: tuple[Path, ...]) -> nn.Module:
        """quantise(S + chain), without a delta: the loaded model when it is that, else a fresh load (the old
        model dropped first: one model in memory at a time)."""
        if self._model is None or self._chain != chain:
            self._drop()
            self._model = self._loader(list(chain), self._merge)
            self._chain = chain
        if self._delta is not None:
            self._delta.detach()
            self._delta = None
        return self._model

    def _drop(self) -> None:
        if self._delta is not None:
            self._delta.detach()
        self._model = self._chain = self._delta = None
        release_memory()

    def model_for(self, chain: Sequence[Path]) -> nn.Module:
        return self._base_for(tuple(Path(p) for p in chain))

    def drift_model(self, chain: Sequence[Path]) -> nn.Module | None:
        """The trained P_{t-1}, exactly: the base step t-1 trained on (requantised with chain[:-1]) plus
        step t-1's own adapter as a frozen delta. None for step 1 (M_0 = S needs no merge)."""
        chain = tuple(Path(p) for p in chain)
        if not chain:
            return None
        model = self._base_for(chain[:-1])
        self._delta = FrozenDelta.from_factors(load_all_factors(list(chain[-1:])), self._dtype, self._device)
        self._delta.attach(model)
        return model

    def delta_parameters(self) -> int:
        return 0

    def release(self) -> None:
        self._drop()


Holder = ExactHolder | RequantizedHolder


def make_holder(mode: str, *, loader: Loader, merge: str, quant: QuantSettings, device: torch.device) -> Holder:
    return REFERENCE_MODES[mode](loader, merge, quant, device)


REFERENCE_MODES: dict[str, Callable[[Loader, str, QuantSettings, torch.device], Holder]] = {
    "exact": lambda loader, _merge, quant, device: ExactHolder(loader, quant, device),
    "requantized": RequantizedHolder,
}


def load_for(model_dir: Path, quant: QuantSettings, device: torch.device, progress: Any) -> Loader:
    def loader(adapters: Sequence[Path], merge: str) -> nn.Module:
        return load_quantized(
            model_dir, adapters=list(adapters), merge=merge, quant=quant, device=device, progress=progress
        )

    return loader
