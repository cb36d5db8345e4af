"""LoRA dropout with CPU masks drawn a 64-bit word at a time.

peft puts an nn.Dropout before every LoRA factor A, so a training step draws one mask per LoRA layer and
micro-batch, over the layer's whole input ([tokens, in_features]), and gradient checkpointing draws it again
in the recomputation. On CPU torch draws a dropout mask element by element (bernoulli_): on SmolLM2-135M
(210 LoRA layers, 2 pairs of about 420 tokens a side) that was 2.2 s of a 9.6 s micro-step on a 2-core
AVX-512 Xeon (torch 2.13), more than the attention. `LaneDropout` draws whole 64-bit words from torch's
default generator (`random_` over the int64 range, serial Mersenne Twister) and reads each word as four
16-bit lanes (two 32-bit lanes where p needs the resolution): an element is dropped when its lane lies
under a threshold. A [860, 1536] fp32 mask and multiply: 2.6 ms against F.dropout's 9.3 ms.

What changes against nn.Dropout(p), and what does not:
  * the drop probability is a multiple of 2^-16 (2^-32): p' = round(p * 2^16) / 2^16 when that is within
    P_REL_TOL of p (p = 0.05: p' = 3277 / 65536 = 0.0500031), else the 32-bit lanes; where even 32 bits
    miss p by more (p < 1e-7), or p >= 1, F.dropout runs. Kept elements are scaled by 1 / (1 - p'), so the
    output's expectation is the input exactly, as with inverted dropout;
  * the masks are other draws than torch's, so a run is not bit-equal to one with nn.Dropout
    (`--lora-dropout-impl torch` runs peft's own module);
  * draws come from the default CPU generator, so `torch.manual_seed` reproduces them and activation
    checkpointing, which stashes and restores that generator's state around the recomputation, replays
    the same mask in backward; the serial generator gives the same masks on every host and thread count.
Off CPU, F.dropout runs: CUDA draws masks in its fused kernel, where this would only add launches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Lane widths, narrowest (cheapest: four per generator word) first.
LANE_DTYPES: tuple[torch.dtype, ...] = (torch.int16, torch.int32)
# How far the realised drop probability may be from the one asked for, relative to it.
P_REL_TOL = 1e-3
# random_(low, high) draws from [low, high): every 64-bit pattern but the all-ones-but-sign one, whose
# absence (and the doubled weight of `low`) moves a lane's probabilities by about 2^-64.
_WORD_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Lanes:
    """How one dropout layer reads random words: lane dtype, and the threshold under which a lane drops its
    element (P(lane < threshold) = p exactly, p a multiple of 2^-bits)."""

    dtype: torch.dtype
    threshold: int
    p: float

    @property
    def per_word(self) -> int:
        """Lanes in one 64-bit word."""
        return 64 // torch.iinfo(self.dtype).bits

    @property
    def scale(self) -> float:
        """What a kept element is multiplied by: 1 / (1 - p), inverted dropout's."""
        return 1.0 / (1.0 - self.p)


def lanes_for(p: float) -> Lanes | None:
    """The narrowest lanes that realise p within P_REL_TOL, or None (F.dropout is used then)."""
    if not 0.0 < p < 1.0:
        return None
    for dtype in LANE_DTYPES:
        info = torch.iinfo(dtype)
        levels = 2**info.bits
        k = round(p * levels)
        if 0 < k < levels and abs(k / levels - p) <= P_REL_TOL * p:
            return Lanes(dtype, info.min + k, k / levels)
    return None


def dropped_mask(shape: torch.Size, lanes: Lanes) -> torch.Tensor:
    """A bool tensor of `shape`: True where an element is dropped, each with probability lanes.p, independent."""
    n = shape.numel()
    words = torch.empty(-(-n // lanes.per_word), dtype=torch.int64).random_(*_WORD_RANGE)
    return words.view(lanes.dtype)[:n].view(shape) < lanes.threshold


class LaneDropout(nn.Module):
    """Inverted dropout like nn.Dropout(p), its CPU masks from lanes of 64-bit random words (module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.lanes = lanes_for(self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.lanes is None or x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        dropped = dropped_mask(x.shape, self.lanes)
        return x.mul(self.lanes.scale).masked_fill_(dropped, 0.0)

    def extra_repr(self) -> str:
        realised = "" if self.lanes is None else f", realised p={self.lanes.p:.7g} ({self.lanes.dtype})"
        return f"p={self.p}{realised}"


# --lora-dropout-impl -> the module that replaces peft's nn.Dropout(p) (None: peft's own is kept).
DROPOUT_IMPLS: dict[str, Callable[[float], nn.Module] | None] = {
    "lanes": LaneDropout,
    "torch": None,
}


def install_dropout(model: nn.Module, impl: str) -> int:
    """Replace the nn.Dropout of every LoRA layer of a peft model by DROPOUT_IMPLS[impl]; returns how many were
    replaced. peft keeps them in each LoRA layer's `lora_dropout` ModuleDict (one per adapter) and calls them
    by that name, so a replaced entry is what the layer's forward runs. nn.Identity (dropout 0) stays."""
    if impl not in DROPOUT_IMPLS:
        raise ValueError(f"unknown LoRA dropout impl {impl!r}; known: {', '.join(DROPOUT_IMPLS)}")
    make = DROPOUT_IMPLS[impl]
    if make is None:
        return 0
    replaced = 0
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if not isinstance(holder, nn.ModuleDict):
            continue
        for name, dropout in list(holder.items()):
            if type(dropout) is nn.Dropout:
                holder[name] = make(dropout.p)
                replaced += 1
    return replaced
