"""Training units: what one row of the loss sees, for paired and unpaired steps alike.

A unit is (chosen prompt, chosen answer, rejected prompt, rejected answer). For preference pairs both
prompts are the same. For unpaired data (prompt, completion, label) a unit puts one desirable example on
the chosen side and one undesirable example on the rejected side: batches are then balanced 1:1, which
KTO recommends and AOT's unpaired quantile matching needs (equal numbers to sort). The minority label is
cycled so that every example of the majority is used once per epoch.

Every unit also has two "mismatched" rows for KTO's KL reference point: its answers under the prompts of
the next unit. They are fixed per step (not per batch), so their reference log-probs can be cached.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lowmem_sdpo.data import IGNORE_INDEX, TokenizedStep, pad_rows
from lowmem_sdpo.errors import InputError


@dataclass(frozen=True)
class Unit:
    chosen_prompt: list[int]
    chosen: list[int]
    rejected_prompt: list[int]
    rejected: list[int]


def build_units(tokenized: TokenizedStep, *, seed: int, label: str) -> tuple[list[Unit], str]:
    """-> (units, kind) with kind "pairs" or "unpaired"."""
    if tokenized.pairs:
        units = [Unit(p.prompt_ids, p.chosen_ids, p.prompt_ids, p.rejected_ids) for p in tokenized.pairs]
        return units, "pairs"
    if not tokenized.unpaired:
        raise InputError(
            f"step '{label}': no examples left after tokenization (see `lowmem-sdpo data inspect`)"
        )
    good = [e for e in tokenized.unpaired if e.label]
    bad = [e for e in tokenized.unpaired if not e.label]
    if not good or not bad:
        missing = "desirable" if not good else "undesirable"
        raise InputError(
            f"step '{label}': unpaired data has no {missing} examples (each batch pairs a desirable with an "
            "undesirable one; check the label column or --desirable-threshold)"
        )
    rng = random.Random(f"units-{seed}")
    rng.shuffle(good)
    rng.shuffle(bad)
    n = max(len(good), len(bad))
    units = [
        Unit(
            good[i % len(good)].prompt_ids,
            good[i % len(good)].completion_ids,
            bad[i % len(bad)].prompt_ids,
            bad[i % len(bad)].completion_ids,
        )
        for i in range(n)
    ]
    return units, "unpaired"


def kl_rows(units: list[Unit], index: int) -> list[tuple[list[int], list[int]]]:
    """Unit `index`'s answers under the next unit's prompts (wrapping around)."""
    other = units[(index + 1) % len(units)]
    unit = units[index]
    return [(other.chosen_prompt, unit.chosen), (other.rejected_prompt, unit.rejected)]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF labels (token t scored at position t) -> kernel labels (position t scores token t + 1)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def collate_units(units: list[Unit], pad_id: int) -> dict[str, torch.Tensor]:
    """[2B, T]: chosen rows then rejected rows; `labels` already shifted for sequence_logprobs."""
    rows = [(u.chosen_prompt, u.chosen) for u in units] + [(u.rejected_prompt, u.rejected) for u in units]
    return _collate(rows, pad_id)


def collate_kl(all_units: list[Unit], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """[2B, T]: the mismatched chosen rows of the B units, then their mismatched rejected rows."""
    pairs = [kl_rows(all_units, i) for i in indices]
    return _collate([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    batch = pad_rows(rows, pad_id)
    batch["labels"] = shift_labels(batch["labels"])
    return batch
