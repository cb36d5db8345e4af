"""Preference objectives: DPO (sigmoid), IPO, hinge, DPOP, AOT (paired / unpaired) and KTO.

`preference_loss(name, pc, pr, rc, rr, beta=..., **options)` -> (losses, chosen_rewards,
rejected_rewards); `LOSSES` is the registry (`lowmem-sdpo losses` lists it).
"""

from lowmem_sdpo.losses.registry import (
    LOSSES,
    LossOption,
    LossSpec,
    add_loss_arguments,
    get_loss,
    loss_options_from_args,
    preference_loss,
)

__all__ = [
    "LOSSES",
    "LossOption",
    "LossSpec",
    "add_loss_arguments",
    "get_loss",
    "loss_options_from_args",
    "preference_loss",
]
