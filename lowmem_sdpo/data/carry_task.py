"""The carry toy task: two-digit additions "a+b=" (a, b in 10..99), answers in decimal, then EOS.

Every one of the 8100 problems lands in exactly one split, by a seeded shuffle: the held-out split (scored once
per configuration, never used for a choice), a validation split (where the settings were chosen), S's warm-up
corpus, and the two sDPO steps. The steps are a curriculum: step 1 holds the problems whose units do not carry
(digit-wise sums), step 2 those that do (the carry into the tens is what it adds). DPO on the union sees both.

A pair's rejected answer is a plausible mistake of the kind a half-trained model makes, drawn uniformly from
four: the tens digit one too low (for a carrying problem that is the dropped carry, 47+38 -> 75) or one too
high (for one that does not carry, a spurious carry), or the units digit one off either way. Uniform on
purpose: with the carry mistakes favoured, step 1's rejected answers would mostly be too high and step 2's too
low, and each step would teach "prefer the lower (higher) tens digit", a bias the other undoes, rather than
arithmetic.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

OPERANDS = range(10, 100)
# The one split everything uses (S's warm-up corpus in models/tiny.py's CARRY_RECIPE, the benchmark, the demo).
SPLIT_SEED = 0
SPLIT_SIZES: dict[str, int] = {
    "heldout": 400,
    "validation": 400,
    "warmup": 3000,
    "step1": 1500,
    "step2": 1500,
}


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def mistakes(a: int, b: int) -> list[int]:
    """The four one-digit slips: tens digit -1 / +1 (answer -10 / +10), units digit -1 / +1 with the tens kept
    (85 -> 84, 86; 80 -> 89, 81). All distinct from the right answer and non-negative for a, b >= 10."""
    right = a + b
    return [right - 10, right + 10] + [right - right % 10 + (right + d) % 10 for d in (-1, 1)]


@dataclass(frozen=True)
class ToySplits:
    heldout: list[tuple[int, int]]
    validation: list[tuple[int, int]]
    warmup: list[tuple[int, int]]
    step1: list[tuple[int, int]]  # no carry
    step2: list[tuple[int, int]]  # carry


def split_problems(
    seed: int, *, heldout: int, validation: int, warmup: int, step1: int, step2: int
) -> ToySplits:
    """Disjoint problem sets. Held-out, validation and S's warm-up corpus are drawn first, in that order, so the
    step sizes can change without changing S (or the scored splits)."""
    problems = [(a, b) for a in OPERANDS for b in OPERANDS]
    random.Random(f"carry-toy-{seed}").shuffle(problems)
    cuts = [0, heldout, heldout + validation, heldout + validation + warmup]
    held, val, warm = (problems[lo:hi] for lo, hi in itertools.pairwise(cuts))
    rest = problems[cuts[-1] :]
    plain = [p for p in rest if not carries(*p)]
    carry = [p for p in rest if carries(*p)]
    if step1 > len(plain) or step2 > len(carry):
        raise ValueError(f"step sizes {step1}/{step2} exceed the {len(plain)}/{len(carry)} problems left")
    return ToySplits(held, val, warm, plain[:step1], carry[:step2])


def pairs(problems: list[tuple[int, int]], seed: int, tag: str) -> list[dict[str, str]]:
    """One standard-schema pair per problem, the rejected answer one of its four slips, uniformly."""
    rng = random.Random(f"carry-pairs-{seed}-{tag}")
    return [
        {"prompt": prompt(a, b), "chosen": str(a + b), "rejected": str(rng.choice(mistakes(a, b)))}
        for a, b in problems
    ]


def with_own_mistakes(rows: list[dict[str, str]], answers: list[str]) -> list[dict[str, str]]:
    """The pairs with the model's own greedy answer as the rejected one wherever that answer is a wrong number
    (the issue's "the model's own plausible mistakes"); the slip stays where the model answered right or not
    with a number."""
    return [
        {**row, "rejected": answer} if answer.isdigit() and answer != row["chosen"] else row
        for row, answer in zip(rows, answers, strict=True)
    ]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
