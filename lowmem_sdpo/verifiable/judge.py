"""The programmatic judge: which constraints a prompt carries (read back from its text), and how many of them
an answer obeys. `score` has the signature of self-reward's `--judge python:module:function`:

    lowmem-sdpo self-reward --judge python:lowmem_sdpo.verifiable.judge:score ...
"""

from __future__ import annotations

from lowmem_sdpo.verifiable.constraints import CONSTRAINTS


def parse_constraints(prompt: str) -> list[tuple[str, str]]:
    """(name, parameter) of every constraint sentence in `prompt`, in registry order."""
    found = []
    for name, constraint in CONSTRAINTS.items():
        match = constraint.pattern().search(prompt)
        if match:
            found.append((name, match.group(1)))
    return found


def met(prompt: str, answer: str) -> list[bool]:
    return [CONSTRAINTS[name].check(answer, param) for name, param in parse_constraints(prompt)]


def score(prompt: str, response: str) -> float | None:
    """The fraction of the prompt's constraints the response obeys; None for a prompt with none."""
    flags = met(prompt, response)
    return sum(flags) / len(flags) if flags else None


def strict(prompt: str, response: str) -> bool:
    """All of the prompt's constraints obeyed (the headline metric)."""
    flags = met(prompt, response)
    return bool(flags) and all(flags)
