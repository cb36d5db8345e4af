"""Build the bundled toy preference data: examples/data/toy_step1.jsonl and toy_step2.jsonl.

The task is addition, small enough for the tiny model (a 0.32M-parameter Llama) to learn on a CPU in a minute:
  step 1 (easy):   single-digit sums, "3+4=" -> chosen "7", rejected an off-by-one/two answer;
  step 2 (harder): two-digit sums, "47+38=" -> chosen "85", rejected the classic slips (a dropped carry,
                   a units or tens digit off by one).
Step 1 teaches the units-digit arithmetic that step 2 reuses, which is what sDPO's curriculum wants.
Standard schema (prompt, chosen, rejected strings). Seeded, so re-running gives byte-identical files.

    python examples/make_toy_data.py [--out examples/data] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lowmem_sdpo.atomic import write_text

REJECTED_PER_EASY_PROBLEM = 3
HARD_PROBLEMS = 300


def easy_pairs(rng: random.Random) -> list[dict[str, str]]:
    """All 100 single-digit additions, each with three distinct plausible wrong answers (300 pairs)."""
    rows = []
    for a in range(10):
        for b in range(10):
            right = a + b
            wrong = [w for w in (right - 2, right - 1, right + 1, right + 2, right + 3) if w >= 0]
            for w in rng.sample(wrong, REJECTED_PER_EASY_PROBLEM):
                rows.append({"prompt": f"{a}+{b}=", "chosen": str(right), "rejected": str(w)})
    rng.shuffle(rows)
    return rows


def hard_wrong_answer(a: int, b: int, rng: random.Random) -> int:
    right = a + b
    dropped_carry = (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10  # 47+38 -> 75 instead of 85
    slips = [right - 1, right + 1, right - 10, right + 10]
    if dropped_carry != right:
        return dropped_carry if rng.random() < 0.5 else rng.choice(slips)
    return rng.choice(slips)


def hard_pairs(rng: random.Random) -> list[dict[str, str]]:
    """300 distinct two-digit additions (about half of them carry), each with one wrong answer."""
    problems = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], HARD_PROBLEMS)
    return [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(hard_wrong_answer(a, b, rng))}
        for a, b in problems
    ]


def to_jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    write_text(args.out / "toy_step1.jsonl", to_jsonl(easy_pairs(rng)))
    write_text(args.out / "toy_step2.jsonl", to_jsonl(hard_pairs(rng)))
    print(f"wrote {args.out / 'toy_step1.jsonl'} and {args.out / 'toy_step2.jsonl'}")


if __name__ == "__main__":
    main()
