"""The prompts of the verifiable-instruction task: topics x constraints, in seeded, disjoint pools.

    step1       D_1's prompts: one constraint each (the easier step)
    step2       D_2's prompts: two compatible constraints each
    validation  where settings are chosen: half one-constraint, half two-constraint prompts
    heldout     scored once per configuration, never used for a choice; same mix as validation

Topics are split first, so the validation and held-out prompts are about topics no training prompt uses:
a gain there is following the instruction, not remembering an answer about the topic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lowmem_sdpo.verifiable.constraints import CONSTRAINTS, compatible

TOPICS = (
    "the ocean", "coffee", "winter", "trains", "music", "gardens", "bicycles", "the moon", "bread", "rain",
    "libraries", "mountains", "cats", "rivers", "chess", "the desert", "bees", "clocks", "bridges", "tea",
    "forests", "volcanoes", "kites", "lighthouses", "maps", "owls", "pianos", "snow", "islands", "candles",
    "football", "honey", "windmills", "umbrellas", "stars", "apples", "cities", "dogs", "paper", "the wind",
    "boats", "museums", "thunder", "gold", "salt", "photography", "the sun", "markets",
)  # fmt: skip
LEAD = "Write a short answer about {}."
SPLIT_SEED = 27
SPLITS = ("step1", "step2", "validation", "heldout")
# Topic shares per pool (training pools share their topics; validation and held-out have their own).
TOPIC_SHARES = {"train": 24, "validation": 12, "heldout": 12}


@dataclass(frozen=True)
class Item:
    topic: str
    constraints: tuple[tuple[str, str], ...]  # (constraint name, parameter), in prompt order

    @property
    def prompt(self) -> str:
        return " ".join([LEAD.format(self.topic), *(CONSTRAINTS[n].render(p) for n, p in self.constraints)])

    def row(self) -> dict[str, object]:
        return {"prompt": self.prompt, "topic": self.topic, "constraints": [list(c) for c in self.constraints]}


def split_topics(seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    out, start = {}, 0
    for name, n in TOPIC_SHARES.items():
        out[name] = topics[start : start + n]
        start += n
    return out


def _draw(rng: random.Random, topics: list[str], k: int) -> Item:
    names = sorted(CONSTRAINTS)
    while True:
        chosen = rng.sample(names, k)
        if compatible(chosen):
            break
    return Item(rng.choice(topics), tuple((n, rng.choice(CONSTRAINTS[n].choices)) for n in chosen))


def build_pools(sizes: dict[str, int], seed: int = SPLIT_SEED) -> dict[str, list[Item]]:
    """`sizes[split]` distinct prompts per split; no prompt text appears in two splits (the training pools
    share topics but not prompts; validation and held-out share neither with anything)."""
    topics = split_topics(seed)
    rng = random.Random(seed)
    seen: set[str] = set()
    pools: dict[str, list[Item]] = {}
    for split in SPLITS:
        pool_topics = topics["train" if split in ("step1", "step2") else split]
        items: list[Item] = []
        attempts = 0
        while len(items) < sizes[split]:
            attempts += 1
            if attempts > 10_000:
                raise ValueError(f"cannot draw {sizes[split]} distinct {split} prompts from {len(pool_topics)} topics")
            k = {"step1": 1, "step2": 2}.get(split, 1 + len(items) % 2)
            item = _draw(rng, pool_topics, k)
            if item.prompt not in seen:
                seen.add(item.prompt)
                items.append(item)
        pools[split] = items
    return pools
