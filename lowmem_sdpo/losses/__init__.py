"""Preference objectives: DPO (sigmoid), IPO, hinge, DPOP, AOT (paired / unpaired) and KTO.

`preference_loss(name, pc, pr, rc, rr, beta=..., **options)` -> (losses, chosen_rewards,
rejected_rewards); `LOSSES` is the registry (`lowmem-sdpo losses` lists it).

The registry (specs.py) is torch-free and imported here; `preference_loss` (registry.py, torch) is imported
on first use, so that the CLI can list losses and parse their flags without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lowmem_sdpo.losses.specs import (
    LOSSES,
    LossOption,
    LossSpec,
    add_loss_arguments,
    get_loss,
    loss_options_from_args,
)

if TYPE_CHECKING:
    from lowmem_sdpo.losses.registry import preference_loss

__all__ = [
    "LOSSES",
    "LossOption",
    "LossSpec",
    "add_loss_arguments",
    "get_loss",
    "loss_options_from_args",
    "preference_loss",
]


def __getattr__(name: str) -> Any:
    if name == "preference_loss":
        from lowmem_sdpo.losses.registry import preference_loss

        return preference_loss
    raise AttributeError(f"module 'lowmem_sdpo.losses' has no attribute {name!r}")
