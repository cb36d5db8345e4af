"""Dividing one source into K steps: disjoint parts that cover every row, sizes equal within one.

Random: a seeded shuffle dealt round-robin. Stratified (`:by=COLUMN`, the paper's "sDPO Strat." ablation):
each value of COLUMN is shuffled and dealt on from where the previous value stopped, so every part holds
each value's rows to within one and the part sizes stay within one of each other.
Each part keeps the rows in source order; training shuffles on its own.
"""

from __future__ import annotations

import json
import random
from collections.abc import Hashable, Sequence
from typing import Any


def random_parts(n_rows: int, k: int, seed: int) -> list[list[int]]:
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return [sorted(order[j::k]) for j in range(k)]


def stratum_key(value: Any) -> Hashable:
    """Any cell value (dicts and lists included) as a hashable, order-stable key."""
    return json.dumps(value, sort_keys=True, default=str)


def stratified_parts(values: Sequence[Any], k: int, seed: int) -> list[list[int]]:
    strata: dict[Hashable, list[int]] = {}
    for index, value in enumerate(values):
        strata.setdefault(stratum_key(value), []).append(index)
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    turn = 0
    for key in sorted(strata, key=str):  # sorted: the result must not depend on row order of first sight
        members = strata[key]
        rng.shuffle(members)
        for index in members:
            parts[turn % k].append(index)
            turn += 1
    return [sorted(p) for p in parts]
