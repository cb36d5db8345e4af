"""Judges: the rubric file (placeholders, braces in user text), a model judging through it, a python judge."""

from __future__ import annotations

import pytest

from lowmem_sdpo.data import load_tokenizer
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import QuantSettings, load_quantized, resolve_model
from lowmem_sdpo.selfreward.generation import SampleSettings
from lowmem_sdpo.selfreward.judge import (
    DEFAULT_RUBRIC,
    ModelJudge,
    PythonJudge,
    fill_rubric,
    judge_kind,
    read_rubric,
)
from lowmem_sdpo.selfreward.scores import parse_score


def test_bundled_rubric_asks_for_the_score_last():
    text = read_rubric(None)
    assert text == DEFAULT_RUBRIC.read_text()
    assert text.rstrip().endswith("Score: <points from 0 to 5>")
    assert all(f"{k}." in text for k in range(1, 6))  # five additive criteria


def test_rubric_needs_both_placeholders(tmp_path):
    bad = tmp_path / "r.txt"
    bad.write_text("Rate {response}.")
    with pytest.raises(InputError, match=r"missing \{prompt\}"):
        read_rubric(bad)


def test_fill_keeps_braces_in_user_text():
    filled = fill_rubric("Q: {prompt}\nA: {response}", 'print({"a": 1})', "{response} stays")
    assert filled == 'Q: print({"a": 1})\nA: {response} stays'


def test_judge_kinds():
    assert [judge_kind(s) for s in ("self", "python:m:f", "org/model", "./dir")] == [
        "self",
        "python",
        "model",
        "model",
    ]


def test_model_judge_samples_each_candidate_and_parses_every_output(tmp_path):
    model_dir = resolve_model("tiny")
    model = load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))
    # A short rubric: the tiny model's context is 128 positions.
    judge = ModelJudge(
        model,
        load_tokenizer(str(model_dir)),
        "{prompt} {response} Score:",
        SampleSettings(n=3, max_new_tokens=4),
    )
    items = [([{"role": "user", "content": "1+2="}], "3"), ([{"role": "user", "content": "2+2="}], "5")]
    first = judge.judge_batch(items, seed=7)
    assert [len(v.outputs) for v in first] == [3, 3]
    assert all(v.scores == [parse_score(o) for o in v.outputs] for v in first)
    again = judge.judge_batch(items, seed=7)
    assert [v.outputs for v in again] == [v.outputs for v in first]  # seeded per batch


def test_python_judge_rejects_non_numbers():
    ok = PythonJudge("python:m:f", lambda p, r: 2, samples=2).judge_batch(
        [([{"role": "user", "content": "q"}], "a")], 0
    )
    assert ok[0].scores == [2.0, 2.0]
    with pytest.raises(InputError, match="returned str"):
        PythonJudge("python:m:f", lambda p, r: "5", samples=1).judge_batch(
            [([{"role": "user", "content": "q"}], "a")], 0
        )
