"""Which units each micro-batch of each optimiser step holds: a pure function of the seed, so a resumed
run knows its data position from the number of optimiser steps done."""

from __future__ import annotations

import math

import torch

Schedule = list[list[list[int]]]  # optimiser step -> micro-batch -> unit indices


def build_schedule(n_units: int, *, epochs: float, batch_size: int, grad_accum: int, seed: int) -> Schedule:
    """ceil(epochs * n_units) units in seeded per-epoch permutations, cut into micro-batches of `batch_size`,
    grouped `grad_accum` to an optimiser step (the last step and micro-batch may be shorter)."""
    if n_units < 1:
        return []
    total = max(1, math.ceil(epochs * n_units))
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order.extend(torch.randperm(n_units, generator=generator).tolist())
        epoch += 1
    order = order[:total]
    micro = [order[i : i + batch_size] for i in range(0, total, batch_size)]
    return [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]
