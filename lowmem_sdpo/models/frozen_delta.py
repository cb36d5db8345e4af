"""M_{t-1} exactly as it was trained: Q(S) plus the finished steps' adapters as one frozen low-rank delta.

Step t-1 trained P_{t-1} = Q(S) + dW_1 + ... + dW_{t-1}, each dW_i = s_i B_i A_i living beside the 4-bit
weight as a LoRA. Requantising S + sum dW re-rolls the NF4 rounding, and at real learning rates (lr 5e-6,
r 16: weights move ~1% of one NF4 step) that re-rolled error is larger than what training moved. Keeping
the factors instead is exact, and cheap: per module

    sum_i s_i B_i A_i = [s_1 B_1 | ... | s_k B_k] @ [A_1; ...; A_k]          (rank r * k)

so the delta is one [out, r*k] and one [r*k, in] matrix, applied as y += (x @ A^T) @ B^T by a forward hook
on the 4-bit module. The hook sits on the base layer itself, so a fresh peft LoRA wrapped around that layer
adds on top of it, and peft's `disable_adapter()` leaves exactly Q(S) + delta, i.e. M_{t-1}.

Memory: SOLAR-10.7B, r 16: (in + out) * 16 summed over its 48 x 7 block linears is ~64M parameters per
finished step, 128 MB in bf16 (the factors are held in the compute dtype: autocast runs the trained LoRA's
matmuls in that dtype too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.adapters import LoraFactor


@dataclass
class LowRank:
    """One module's delta: y += (x @ a.T) @ b.T, with every adapter's scaling folded into b."""

    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def numel(self) -> int:
        return self.a.numel() + self.b.numel()


def concat_factors(factors: Sequence[LoraFactor], dtype: torch.dtype, device: torch.device | str) -> LowRank:
    """[s_1 B_1 | ... | s_k B_k] and [A_1; ...; A_k]; the scaling is folded in fp32 before the cast."""
    if any(f.transpose for f in factors):
        raise InputError("frozen delta: embedding / fan_in_fan_out adapters are not block linears")
    a = torch.cat([f.A.float() for f in factors], dim=0)
    b = torch.cat([f.B.float() * f.scaling for f in factors], dim=1)
    return LowRank(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))


def _delta_hook(delta: LowRank):
    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        # The matmuls run in the factors' dtype (or autocast's); the sum is returned in the output's dtype.
        update = (x.to(delta.a.dtype) @ delta.a.T) @ delta.b.T
        return output + update.to(output.dtype)

    return hook


@dataclass
class FrozenDelta:
    """The finished steps' adapters on a model's modules; `attach` / `detach` switch them on and off."""

    deltas: dict[str, LowRank]
    n_adapters: int
    _handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def from_factors(
        cls, factors: Sequence[dict[str, LoraFactor]], dtype: torch.dtype, device: torch.device | str
    ) -> FrozenDelta:
        names = sorted({name for per_adapter in factors for name in per_adapter})
        deltas = {
            name: concat_factors([f[name] for f in factors if name in f], dtype, device) for name in names
        }
        return cls(deltas, len(factors))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def numel(self) -> int:
        return sum(d.numel() for d in self.deltas.values())

    def attach(self, model: nn.Module) -> None:
        """Hook every delta onto its module of `model` (the plain transformers model, before any peft wrap)."""
        if self.attached:
            raise RuntimeError("frozen delta is already attached")
        modules = dict(model.named_modules())
        for name, delta in self.deltas.items():
            module = modules.get(name)
            if module is None:
                raise InputError(f"frozen delta: the model has no module '{name}' (adapter of another model?)")
            weight_shape = _weight_shape(module)
            if weight_shape != (delta.b.shape[0], delta.a.shape[1]):
                raise InputError(
                    f"frozen delta: module '{name}' is {weight_shape}, the adapter's delta is "
                    f"{(delta.b.shape[0], delta.a.shape[1])} (adapter of another model?)"
                )
            self._handles.append(module.register_forward_hook(_delta_hook(delta)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """[out, in] of a Linear or a bnb Linear4bit (whose packed weight has another shape)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return (int(module.out_features), int(module.in_features))
    return tuple(module.weight.shape)  # type: ignore[return-value]
