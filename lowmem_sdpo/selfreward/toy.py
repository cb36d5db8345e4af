"""The self-rewarding demo's toy task: addition prompts "a+b=", a programmatic judge, and greedy exact match.

A few-hundred-thousand-parameter model cannot follow a rubric, so the demo's judge is a Python function
(passed as `--judge python:lowmem_sdpo.selfreward.toy:judge`, the same hook users have): the answer's
correctness, minus a penalty for length beyond the right answer's, clipped to the rubric's [0, 5].
"""

from __future__ import annotations

import re

from lowmem_sdpo.data.types import Message

JUDGE_SPEC = "python:lowmem_sdpo.selfreward.toy:judge"
CORRECT, WRONG = 5.0, 1.0
LENGTH_PENALTY = 0.5  # per character beyond the right answer's length
_PROBLEM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def problem(prompt: str) -> tuple[int, int] | None:
    found = _PROBLEM.match(prompt)
    return (int(found.group(1)), int(found.group(2))) if found else None


def judge(prompt: str, response: str) -> float | None:
    """Correctness and a length penalty; None for a prompt that is not "a+b=" (no score, not a 0)."""
    parsed = problem(prompt)
    if parsed is None:
        return None
    right = str(sum(parsed))
    answer = response.strip()
    base = CORRECT if answer == right else WRONG
    return max(0.0, min(CORRECT, base - LENGTH_PENALTY * max(0, len(answer) - len(right))))


def conversation(a: int, b: int) -> list[Message]:
    return [{"role": "user", "content": f"{a}+{b}="}]


def exact_match(answers: list[str], problems: list[tuple[int, int]]) -> float:
    return sum(x.strip() == str(a + b) for x, (a, b) in zip(answers, problems, strict=True)) / len(problems)
