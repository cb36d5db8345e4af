"""`NAME@k` splits: seeded, disjoint, covering every row, equal sizes; `:by=COLUMN` keeps each value's share."""

import json
from collections import Counter

import pytest

from lowmem_sdpo.data import load_steps
from lowmem_sdpo.data.splitting import random_parts, stratified_parts

# 103 rows; source "a" x 50, "b" x 33, "c" x 20, interleaved so that file order is not grouped.
SOURCES = ["a"] * 50 + ["b"] * 33 + ["c"] * 20
ORDER = sorted(range(103), key=lambda i: (i * 37) % 103)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "rows.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "source": SOURCES[i]} for i in ORDER]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts(step):
    return [p.prompt[0]["content"] for p in step.pairs]


def source_of(prompt):
    return SOURCES[int(prompt[1:])]


def test_random_parts_are_disjoint_cover_and_equal(data_file):
    steps = load_steps(f"{data_file}@3", seed=1)
    assert [s.label for s in steps] == [f"{data_file}@3 [{j}/3]" for j in (1, 2, 3)]
    parts = [prompts(s) for s in steps]
    assert sorted(len(p) for p in parts) == [34, 34, 35]  # 103 = 34 + 34 + 35
    assert [s.n_source_rows for s in steps] == [len(p) for p in parts]
    everything = [q for p in parts for q in p]
    assert len(set(everything)) == len(everything) == 103  # disjoint, and all 103 rows covered


def test_split_is_deterministic_and_seeded(data_file):
    first = [prompts(s) for s in load_steps(f"{data_file}@3", seed=1)]
    assert [prompts(s) for s in load_steps(f"{data_file}@3", seed=1)] == first
    assert [prompts(s) for s in load_steps(f"{data_file}@3", seed=2)] != first


def test_stratified_parts_keep_every_value_share(data_file):
    steps = load_steps(f"{data_file}@3:by=source", seed=5)
    everything = [q for s in steps for q in prompts(s)]
    assert len(set(everything)) == len(everything) == 103
    for step in steps:
        mix = Counter(source_of(q) for q in prompts(step))
        # 50/3 = 16.7 -> 16 or 17; 33/3 = 11 exactly; 20/3 = 6.7 -> 6 or 7.
        assert mix["a"] in (16, 17) and mix["b"] == 11 and mix["c"] in (6, 7)
    assert sorted(s.n_source_rows for s in steps) == [34, 34, 35]


def test_one_part_is_the_whole_source_in_file_order(data_file):
    (step,) = load_steps(f"{data_file}@1")
    assert step.label == f"{data_file}@1"
    assert prompts(step) == [f"q{i}" for i in ORDER]


def test_split_functions_directly():
    parts = random_parts(10, 4, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert sorted(len(p) for p in parts) == [2, 2, 3, 3]
    values = [{"kind": "x"}] * 4 + [{"kind": "y"}] * 4  # dict values (BeaverTails' category) stratify too
    for part in stratified_parts(values, 2, seed=3):
        assert Counter(values[i]["kind"] for i in part) == {"x": 2, "y": 2}
