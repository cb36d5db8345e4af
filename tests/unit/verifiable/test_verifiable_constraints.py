"""Every constraint checker of the verifiable-instruction task on hand-worked answers, each obeyed and broken,
and the judge reading the constraints back from a prompt's text (issue 27)."""

from __future__ import annotations

import pytest

from lowmem_sdpo.verifiable.constraints import CONSTRAINTS, compatible
from lowmem_sdpo.verifiable.judge import parse_constraints, score, strict

# (constraint, parameter, answer, obeyed), worked by hand.
CASES = [
    ("max_words", "10", "Tea is a hot drink made from leaves.", True),  # 8 words
    ("max_words", "10", "one two three four five six seven eight nine ten", True),  # exactly 10
    ("max_words", "10", "one two three four five six seven eight nine ten eleven", False),
    ("max_words", "15", "- a\n- b", True),  # the markers are no words: 2
    ("min_words", "15", "one two three four five six seven eight nine ten eleven twelve thirteen fourteen", False),
    ("min_words", "15", "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen", True),
    ("include_word", "bright", "The Bright sun rose.", True),  # any case
    ("include_word", "bright", "The brightest sun rose.", False),  # a whole word, not a prefix
    ("include_word", "every", "Almost everyone agrees.", False),
    ("include_word", "every", "Tea, every day.", True),
    ("lowercase", "everything", "tea is good. really.", True),
    ("lowercase", "everything", "Tea is good.", False),
    ("lowercase", "everything", "42 !", False),  # no letter: not vacuously lowercase
    ("end_phrase", "That is all.", "Tea is hot. That is all.  \n", True),  # trailing space is not the answer
    ("end_phrase", "That is all.", "Tea is hot. That is all", False),  # the full stop belongs to the phrase
    ("end_phrase", "The end.", "The end. Tea is hot.", False),
    ("no_commas", "any", "Tea is hot and green.", True),
    ("no_commas", "any", "Tea is hot, and green.", False),
    ("no_commas", "any", "   ", False),  # an empty answer obeys nothing
    ("bullets", "2", "- tea\n- coffee", True),
    ("bullets", "2", "Here:\n* tea\n  - coffee\nThat is it.", True),  # either marker, indented too
    ("bullets", "2", "- tea\n- coffee\n- water", False),
    ("bullets", "3", "-tea\n-coffee\n-water", False),  # a marker needs its space
    ("bullets", "3", "- tea\n-\n- coffee\n- water", True),  # a bare "-" line is no bullet
    ("start_word", "Yes", "  Yes, tea is hot.", True),
    ("start_word", "Yes", "Yesterday tea was hot.", False),  # the word, not a prefix
    ("start_word", "Yes", "yes, tea is hot.", False),  # as written
    ("start_word", "Today", "\"Today\" is a word.", False),
    ("quotes", "whole", '"Tea is hot."', True),
    ("quotes", "whole", ' "Tea is hot." \n', True),
    ("quotes", "whole", '"Tea" is hot.', False),
    ("quotes", "whole", '"', False),  # one quote mark wraps nothing
    ("json_key", "answer", '{"answer": "tea"}', True),
    ("json_key", "answer", '```json\n{"answer": "tea", "x": 1}\n```', True),  # a fenced block is read inside
    ("json_key", "answer", '{"Answer": "tea"}', False),  # keys are case-sensitive
    ("json_key", "answer", '{"answer": "tea"', False),  # not JSON
    ("json_key", "answer", '["answer"]', False),  # not an object
    ("json_key", "summary", 'Here: {"summary": "tea"}', False),  # JSON with text around it is not JSON
]


@pytest.mark.parametrize(("name", "param", "answer", "obeyed"), CASES)
def test_checker_on_hand_worked_answers(name: str, param: str, answer: str, obeyed: bool) -> None:
    assert CONSTRAINTS[name].check(answer, param) is obeyed


def test_every_constraint_has_cases_both_ways() -> None:
    seen = {(name, obeyed) for name, _, _, obeyed in CASES}
    assert seen == {(name, b) for name in CONSTRAINTS for b in (True, False)}


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_each_sentence_reads_back_to_its_parameter(name: str) -> None:
    for param in CONSTRAINTS[name].choices:
        prompt = f"Write a short answer about tea. {CONSTRAINTS[name].render(param)}"
        assert parse_constraints(prompt) == [(name, param)]


def test_judge_is_the_fraction_met_and_strict_needs_all() -> None:
    prompt = (
        'Write a short answer about tea. Include the word "simple". Write everything in lowercase letters.'
    )
    assert parse_constraints(prompt) == [("include_word", "simple"), ("lowercase", "everything")]
    assert score(prompt, "tea is simple.") == 1.0 and strict(prompt, "tea is simple.")
    assert score(prompt, "Tea is simple.") == 0.5 and not strict(prompt, "Tea is simple.")
    assert score(prompt, "Tea is hot.") == 0.0 and not strict(prompt, "Tea is hot.")
    # No constraint in the prompt: unscored (self-reward leaves such a candidate out of the pairs).
    assert score("Write a short answer about tea.", "tea") is None
    assert not strict("Write a short answer about tea.", "tea")


def test_compatible_refuses_a_shared_slot() -> None:
    assert compatible(["max_words", "include_word"])
    assert not compatible(["max_words", "min_words"])  # both the length
    assert not compatible(["json_key", "start_word"])  # JSON starts with a brace
    assert not compatible(["quotes", "end_phrase"])  # both the last characters
