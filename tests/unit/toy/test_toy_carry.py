"""The carry toy (lowmem_sdpo.toy): disjoint splits, right chosen and plausible wrong rejected answers, and a
scorer whose batched greedy decoding and accuracies agree with one-prompt-at-a-time computation."""

from __future__ import annotations

import json

import torch

from lowmem_sdpo.data import carry_task as task
from lowmem_sdpo.models import resolve_model
from lowmem_sdpo.toy.score import ToyScorer


def test_splits_are_disjoint_and_steps_are_the_curriculum():
    splits = task.split_problems(task.SPLIT_SEED, **task.SPLIT_SIZES)
    parts = [splits.heldout, splits.validation, splits.warmup, splits.step1, splits.step2]
    assert [len(p) for p in parts] == [
        task.SPLIT_SIZES[k] for k in ("heldout", "validation", "warmup", "step1", "step2")
    ]
    seen: set[tuple[int, int]] = set()
    for part in parts:
        assert not seen & set(part)
        seen |= set(part)
    assert not any(task.carries(*p) for p in splits.step1) and all(task.carries(*p) for p in splits.step2)
    # Held-out does not depend on the other sizes (it is drawn first), nor S's warm-up corpus on the step sizes.
    other = task.split_problems(task.SPLIT_SEED, heldout=400, validation=10, warmup=5, step1=5, step2=5)
    assert other.heldout == splits.heldout
    sizes = {k: task.SPLIT_SIZES[k] for k in ("heldout", "validation", "warmup")}
    assert task.split_problems(task.SPLIT_SEED, **sizes, step1=0, step2=0).warmup == splits.warmup


def test_pairs_are_right_against_a_plausible_slip():
    problems = task.split_problems(task.SPLIT_SEED, **task.SPLIT_SIZES).step2
    rows = task.pairs(problems, 0, "t")
    assert rows == task.pairs(problems, 0, "t")  # seeded
    dropped = 0
    for (a, b), row in zip(problems, rows, strict=True):
        assert row["prompt"] == f"{a}+{b}=" and int(row["chosen"]) == a + b
        wrong = int(row["rejected"])
        assert len(set(task.mistakes(a, b)) - {a + b}) == 4 and wrong in task.mistakes(a, b)
        assert abs(wrong - (a + b)) == 10 or wrong // 10 == (a + b) // 10  # one digit slipped
        dropped += wrong == a + b - 10  # step 2's problems all carry: this is the dropped carry
    assert 0.15 < dropped / len(rows) < 0.35  # one slip in four


def test_own_mistakes_replace_the_slip_only_where_the_model_answered_a_wrong_number():
    rows = task.pairs([(47, 38), (12, 13), (50, 50), (99, 99)], 0, "t")
    out = task.with_own_mistakes(rows, ["75", "25", "1O0", ""])
    assert out[0] == {**rows[0], "rejected": "75"}  # the model's dropped carry
    assert out[1:] == rows[1:]  # right answer, not a number, nothing: the slip stays


def test_scorer_agrees_with_single_prompt_computation():
    rows = task.pairs(task.split_problems(task.SPLIT_SEED, **task.SPLIT_SIZES).validation[:12], 0, "v")
    scorer = ToyScorer(resolve_model("tiny"), rows)
    try:
        model = scorer.holder.model_for([])
        eos = scorer.tokenizer.eos_token_id
        singles = []
        for unit in scorer.units:  # no padding at all: the reference for the batched, left-padded decoding
            ids = torch.tensor([unit.chosen_prompt])
            for _ in range(5):
                nxt = model(input_ids=ids).logits[0, -1].argmax().item()
                if nxt == eos:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            singles.append(
                scorer.tokenizer.decode(ids[0, len(unit.chosen_prompt) :].tolist()) if nxt == eos else None
            )
        batched = scorer.greedy([])
        assert [b for b, s in zip(batched, singles, strict=True) if s is not None] == [
            s for s in singles if s is not None
        ]
        scores = scorer.score([])
        margins = scorer.base.chosen - scorer.base.rejected
        assert scores["preference_accuracy"] == float((margins > 0).double().mean())
        assert scores["reward_accuracy"] is None  # S against itself: no reward
        assert scores["exact_match"] == sum(b == r["chosen"] for b, r in zip(batched, rows, strict=True)) / 12
    finally:
        scorer.release()


def test_tiny_carry_builds_from_the_warmup_split_only(tmp_path, monkeypatch):
    from lowmem_sdpo.models import tiny

    splits = task.split_problems(task.SPLIT_SEED, **task.SPLIT_SIZES)
    corpus = tiny.recipe_problems(tiny.CARRY_RECIPE)
    assert corpus == splits.warmup  # S never saw a held-out, validation or step problem as SFT data
    # A 3-step warm-up runs every code path of the preset's build (its corpus, the ramp + cosine schedule).
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(tiny.CARRY_RECIPE["warmup"], "steps", 3)
    built = resolve_model("tiny-carry")
    assert built.name.startswith("tiny-carry-") and built == tiny.tiny_model_dir(tmp_path, tiny.CARRY_RECIPE)
    record = json.loads((built / tiny.RECIPE_FILE).read_text())
    assert record["recipe"]["task"] == "carry" and record["recipe"]["warmup"]["steps"] == 3
    assert built != tiny.tiny_model_dir(tmp_path)  # `tiny` is another model, in another directory
