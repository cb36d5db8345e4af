"""The constraints of the verifiable-instruction task, one registry entry each (issue 27, after IFEval).

A constraint is a sentence appended to a prompt and a function of the answer alone that says whether the
answer obeys it. The sentence is rendered from a template with one parameter, and the same template read
backwards (a regular expression) recovers the parameter from the prompt text, so the judge needs nothing but
the prompt and the answer: a `--judge python:...` function has exactly those.

`slots` name the parts of an answer a constraint pins down (its start, its end, its overall shape...); two
constraints go into one prompt only if their slots are disjoint, so no prompt asks for the impossible (JSON
that also starts with "Yes", at most 10 and at least 30 words).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

# What a bullet line starts with: "- " or "* " (markdown's two list markers), after leading spaces.
BULLET = re.compile(r"^\s*[-*]\s+\S")
# A fenced block around JSON (```json ... ```), which chat models write by habit; the key check looks inside.
FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class Constraint:
    name: str
    template: str  # one "{}" for the parameter
    choices: tuple[str, ...]  # the parameters a prompt may draw
    slots: frozenset[str]
    check: Callable[[str, str], bool]  # (answer, parameter) -> obeyed

    def render(self, param: str) -> str:
        return self.template.format(param)

    def pattern(self) -> re.Pattern[str]:
        """The rendered sentence, read backwards; the parameter is one of `choices`, so a match cannot run
        on into the neighbouring sentences."""
        head, tail = self.template.split("{}")
        options = "|".join(re.escape(c) for c in self.choices)
        return re.compile(re.escape(head) + f"({options})" + re.escape(tail))


def words(text: str) -> list[str]:
    """Whitespace-separated tokens that hold a letter or digit (a lone "-" bullet marker is no word)."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def at_most_words(answer: str, n: str) -> bool:
    return len(words(answer)) <= int(n)


def at_least_words(answer: str, n: str) -> bool:
    return len(words(answer)) >= int(n)


def includes_word(answer: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) is not None


def all_lowercase(answer: str, _: str = "") -> bool:
    # An answer with no letter at all is not "written in lowercase": it would pass vacuously otherwise.
    return any(c.isalpha() for c in answer) and answer == answer.lower()


def ends_with(answer: str, phrase: str) -> bool:
    return answer.rstrip().endswith(phrase)


def no_commas(answer: str, _: str = "") -> bool:
    return bool(answer.strip()) and "," not in answer


def exactly_bullets(answer: str, k: str) -> bool:
    return sum(bool(BULLET.match(line)) for line in answer.splitlines()) == int(k)


def starts_with_word(answer: str, word: str) -> bool:
    return re.match(rf"\s*{re.escape(word)}\b", answer) is not None


def wrapped_in_quotes(answer: str, _: str = "") -> bool:
    text = answer.strip()
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


def json_with_key(answer: str, key: str) -> bool:
    text = answer.strip()
    fenced = FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and key in value


CONSTRAINTS: dict[str, Constraint] = {
    c.name: c
    for c in (
        Constraint("max_words", "Use at most {} words.", ("10", "15", "20"), frozenset({"length"}), at_most_words),
        Constraint("min_words", "Use at least {} words.", ("15", "20"), frozenset({"length"}), at_least_words),
        Constraint(
            "include_word", 'Include the word "{}".', ("simple", "bright", "every", "small", "people"),
            frozenset({"word"}), includes_word,
        ),
        Constraint("lowercase", "Write {} in lowercase letters.", ("everything",), frozenset({"case"}), all_lowercase),
        Constraint(
            "end_phrase", 'End your answer with the phrase "{}"', ("That is all.", "Thank you.", "The end."),
            frozenset({"end"}), ends_with,
        ),
        Constraint("no_commas", "Do not use {} commas.", ("any",), frozenset({"commas"}), no_commas),
        Constraint(
            "bullets", 'Answer with exactly {} bullet points starting with "- ".', ("2", "3"),
            frozenset({"start", "end", "shape"}), exactly_bullets,
        ),
        Constraint(
            "start_word", 'Start your answer with the word "{}".', ("Yes", "Today", "Here"),
            frozenset({"start"}), starts_with_word,
        ),
        Constraint(
            "quotes", "Wrap your {} answer in double quotes.", ("whole",), frozenset({"start", "end", "shape"}),
            wrapped_in_quotes,
        ),
        Constraint(
            "json_key", 'Answer in JSON with the key "{}".', ("answer", "summary", "topic"),
            frozenset({"start", "end", "shape", "commas"}), json_with_key,
        ),
    )
}  # fmt: skip


def compatible(names: list[str]) -> bool:
    """No two of the constraints pin down the same slot."""
    seen: set[str] = set()
    for name in names:
        slots = CONSTRAINTS[name].slots
        if seen & slots:
            return False
        seen |= slots
    return True
