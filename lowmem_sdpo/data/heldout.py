"""Held-out examples of a step (`--eval-split F`): a seeded fraction of D_t kept out of training.

The draw depends only on the seed, the step's index and its size, so a rerun or --resume holds out the same
examples; the training part keeps the rest in source order.
"""

from __future__ import annotations

import dataclasses
import random

from lowmem_sdpo.data.types import StepData
from lowmem_sdpo.errors import InputError


def split_heldout(step: StepData, fraction: float, seed: int, t: int) -> tuple[StepData, StepData]:
    """(the part trained on, the part held out) of step t's data."""
    examples = step.pairs or step.unpaired
    n = len(examples)
    k = round(fraction * n)
    if k < 1 or k >= n:
        raise InputError(
            f"--eval-split {fraction}: step {t} ('{step.label}') has {n} examples, which leaves {k} held out and "
            f"{n - k} to train on; each needs at least one"
        )
    held = set(random.Random(f"heldout-{seed}-{t}").sample(range(n), k))
    train = [e for i, e in enumerate(examples) if i not in held]
    kept = [e for i, e in enumerate(examples) if i in held]
    field = "pairs" if step.pairs else "unpaired"
    return (
        dataclasses.replace(step, **{field: train}, n_source_rows=n - k, drops={}),
        dataclasses.replace(step, label=f"{step.label} (held out)", **{field: kept}, n_source_rows=k, drops={}),
    )
