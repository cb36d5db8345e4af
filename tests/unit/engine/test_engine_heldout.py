"""Held-out evaluation during a run (--eval-split / --eval-steps / --eval-every): which pairs are held out, the
eval/... figures against an independent computation, the summary, and the resume keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.data import StepData, load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.data.heldout import split_heldout
from lowmem_sdpo.data.types import PreferencePair
from lowmem_sdpo.engine.reference.heldout import heldout_data
from lowmem_sdpo.engine.units import build_units
from lowmem_sdpo.errors import InputError
from tests.support.engine_fixtures import reference_table, run, small_config
from tests.support.evaluated_run import EVAL_EVERY, EVAL_SPLIT, evaluated_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return evaluated_run(tmp_path_factory)


def _step(n: int) -> StepData:
    pairs = [PreferencePair([{"role": "user", "content": f"q{i}"}], f"c{i}", f"r{i}") for i in range(n)]
    return StepData("s.jsonl", "s.jsonl", "standard", pairs, n_source_rows=n)


def test_split_is_disjoint_covering_seeded_and_per_step():
    step = _step(40)
    train, held = split_heldout(step, 0.25, seed=3, t=1)
    assert len(held.pairs) == 10 and len(train.pairs) == 30
    assert sorted(p.chosen for p in train.pairs + held.pairs) == sorted(p.chosen for p in step.pairs)
    assert not {p.chosen for p in train.pairs} & {p.chosen for p in held.pairs}
    again = split_heldout(step, 0.25, seed=3, t=1)[1]
    assert [p.chosen for p in again.pairs] == [p.chosen for p in held.pairs]
    other = {p.chosen for p in split_heldout(step, 0.25, seed=3, t=2)[1].pairs}
    assert other != {p.chosen for p in held.pairs}  # each step draws its own
    with pytest.raises(InputError, match="step 1"):
        split_heldout(_step(2), 0.1, seed=0, t=1)


def test_eval_steps_one_item_for_all_or_one_per_step(tmp_path):
    config = small_config(tmp_path)
    steps = load_steps(config.steps)
    s1 = config.steps.split(",")[0]
    config.eval_steps = s1
    _, held = heldout_data(config, steps)
    assert [h.fingerprint() for h in held] == [steps[0].fingerprint()] * 2
    config.eval_steps = f"{s1},{s1},{s1}"
    with pytest.raises(InputError, match="3 items for 2 steps"):
        heldout_data(config, steps)


def _heldout_units(config, t: int):
    step = load_steps(config.steps, seed=config.seed)[t - 1]
    _, held = split_heldout(step, EVAL_SPLIT, config.seed, t)
    tokenizer = load_tokenizer("tiny")
    tokenized = tokenize_step(held, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    return build_units(tokenized, seed=config.seed, label="held")[0], tokenizer.pad_token_id


def test_eval_rows_match_an_independent_computation(finished):
    """Step 1: reference S, policy S + adapter 1 through peft (not the engine's frozen delta)."""
    from peft import PeftModel

    from lowmem_sdpo.models import QuantSettings, load_quantized, resolve_model

    config, summaries = finished
    out = Path(config.output_dir)
    rows = [json.loads(line) for line in (out / "step-1" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["opt_step"] for r in rows if "eval/reward_accuracy" in r]
    assert evaluated == [k for k in range(1, len(rows) + 1) if k % EVAL_EVERY == 0 or k == len(rows)]
    units, pad = _heldout_units(config, 1)
    s = load_quantized(resolve_model("tiny"), quant=QuantSettings(compute_dtype="float32"))
    ref = reference_table(s, units, pad)
    policy = reference_table(PeftModel.from_pretrained(s, str(out / "step-1" / "adapter")), units, pad)
    beta = config.beta
    chosen = beta * (policy.chosen.double() - ref.chosen.double())
    rejected = beta * (policy.rejected.double() - ref.rejected.double())
    last = rows[-1]
    assert last["eval/pairs"] == len(units) == round(EVAL_SPLIT * 24)
    assert last["eval/reward_accuracy"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert last["eval/reward_margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-4)
    assert last["eval/rewards_chosen"] == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert last["eval/gamma"] == pytest.approx(float((policy.chosen - policy.rejected).double().mean()), abs=1e-4)
    held = summaries[0]["eval"]
    assert held["gamma_ref"] == pytest.approx(float((ref.chosen - ref.rejected).double().mean()), abs=1e-4)
    assert {k: held[k] for k in ("reward_accuracy", "reward_margin", "gamma")} == {
        k: last[f"eval/{k}"] for k in ("reward_accuracy", "reward_margin", "gamma")
    }
    # the held-out pairs were not trained on: the step trained on the rest
    assert summaries[0]["pairs_used"] == 24 - len(units)
    assert (out / "step-1" / "eval_reference_logps.safetensors").is_file()
    assert torch.isfinite(policy.chosen).all()


def test_resume_refuses_other_held_out_pairs(finished, tmp_path):
    config, _ = finished
    changed = small_config(Path(config.output_dir).parent, diagnostics=True, eval_split=0.5, eval_every=EVAL_EVERY)
    with pytest.raises(InputError, match="eval_split"):
        run(changed, resume=True)


def test_resume_refuses_other_held_out_content(finished, tmp_path):
    """run.json keeps each step's held-out fingerprint; --resume over held-out pairs of other content (say, an
    edited --eval-steps file under the same name) is refused before anything is loaded or written."""
    import dataclasses

    config, _ = finished
    saved = json.loads((Path(config.output_dir) / "run.json").read_text())
    held = load_steps(config.steps, seed=config.seed)
    assert saved["eval_data"] == [
        split_heldout(step, EVAL_SPLIT, config.seed, t)[1].fingerprint() for t, step in enumerate(held, start=1)
    ]
    saved["eval_data"][1] = "0" * 64
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "run.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match="held-out data"):
        run(dataclasses.replace(config, output_dir=str(copy)), resume=True)
    assert sorted(p.name for p in copy.iterdir()) == ["run.json"]
