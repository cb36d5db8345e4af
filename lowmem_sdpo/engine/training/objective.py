"""The run's objective: a loss from `lowmem_sdpo.losses` bound to beta and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.losses import get_loss, preference_loss


@dataclass(frozen=True)
class LogpBatch:
    """Per-unit summed log-probs (and answer token counts) of one micro-batch or window."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    policy_kl: torch.Tensor | None = None
    ref_kl: torch.Tensor | None = None


@dataclass(frozen=True)
class Objective:
    name: str
    beta: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Any:
        return get_loss(self.name)

    @property
    def needs_kl(self) -> bool:
        return bool(self.spec.needs_kl)

    @property
    def batch_coupled(self) -> bool:
        return bool(self.spec.batch_coupled)

    def check_data(self, kind: str, step_label: str) -> None:
        if kind == "unpaired" and self.spec.paired_only:
            unpaired_ok = ", ".join(n for n, s in _all_specs().items() if not s.paired_only)
            raise InputError(
                f"step '{step_label}' holds unpaired data (prompt, completion, label): loss '{self.name}' needs "
                f"preference pairs; use --loss {unpaired_ok}"
            )

    def __call__(self, b: LogpBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        extra: dict[str, Any] = {}
        if self.needs_kl:
            extra = {"policy_kl": b.policy_kl, "ref_kl": b.ref_kl}
        return preference_loss(
            self.name,
            b.policy_chosen,
            b.policy_rejected,
            b.ref_chosen,
            b.ref_rejected,
            beta=self.beta,
            chosen_tokens=b.chosen_tokens,
            rejected_tokens=b.rejected_tokens,
            **self.options,
            **extra,
        )


def _all_specs() -> dict[str, Any]:
    from lowmem_sdpo.losses import LOSSES

    return LOSSES
