"""`lowmem-sdpo eval`: a run's models on preference data, and on a local lm-evaluation-harness task through the
real `lm_eval.simple_evaluate`, each checked against log-probs computed here through peft (not the run's
frozen delta)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.cli import main
from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.units import build_units
from lowmem_sdpo.eval.harness import PRESETS, calls, parse_tasks
from lowmem_sdpo.models import QuantSettings, load_quantized, resolve_model
from tests.support.engine_fixtures import REPO, reference_table, toy_slice
from tests.support.evaluated_run import evaluated_run

TASKS = REPO / "tests" / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return evaluated_run(tmp_path_factory)


@pytest.fixture(scope="module")
def m1(finished):
    """M_1 = S + step 1's adapter through peft, fp32 on CPU; S is the same model under disable_adapter()."""
    from peft import PeftModel

    config, _ = finished
    s = load_quantized(resolve_model("tiny"), quant=QuantSettings(compute_dtype="float32"))
    return PeftModel.from_pretrained(s, str(Path(config.output_dir) / "step-1" / "adapter")).eval()


def test_preference_eval_matches_peft(finished, m1, tmp_path):
    config, _ = finished
    data = toy_slice(tmp_path / "other.jsonl", 2, 16, start=100)  # pairs the run never saw
    assert main(["eval", "--run", config.output_dir, "--data", str(data), "--quiet"]) == 0
    result = json.loads((Path(config.output_dir) / "eval" / "preference-other.json").read_text())
    step = load_steps(str(data))[0]
    tokenizer = load_tokenizer("tiny")
    units = build_units(tokenize_step(step, tokenizer, max_length=32, max_prompt_length=24), seed=0, label="x")[0]
    with m1.disable_adapter():
        s_table = reference_table(m1, units, tokenizer.pad_token_id)
    m1_table = reference_table(m1, units, tokenizer.pad_token_id)
    s_ratio = (s_table.chosen - s_table.rejected).double()
    m1_ratio = (m1_table.chosen - m1_table.rejected).double()
    beta = config.beta
    first, second = result["steps"]
    assert result["units"] == 16 and result["against"] == "M_{t-1}"
    assert result["baseline_S"]["gamma"] == pytest.approx(float(s_ratio.mean()), abs=1e-4)
    assert result["baseline_S"]["ranking_accuracy"] == pytest.approx(float((s_ratio > 0).double().mean()))
    assert first["reference"] == "S" and second["reference"] == "M_1"
    assert first["gamma"] == pytest.approx(float(m1_ratio.mean()), abs=1e-4)
    chosen = beta * (m1_table.chosen.double() - s_table.chosen.double())
    rejected = beta * (m1_table.rejected.double() - s_table.rejected.double())
    assert first["reward_accuracy"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert first["reward_margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-4)
    # against M_1 the margin of M_2 is beta * (gamma of M_2 - gamma of M_1)
    assert second["reward_margin"] == pytest.approx(beta * (second["gamma"] - first["gamma"]), abs=1e-6)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context), tokenised as the harness does (whole minus context)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    answer = whole[len(tokenizer(context, add_special_tokens=False)["input_ids"]) :]
    ids = [tokenizer.bos_token_id, *whole]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(ids) - len(answer) - 1
    return float(sum(logp[start + i, token] for i, token in enumerate(answer)))


def test_lm_eval_runs_a_local_task_on_the_runs_adapters(finished, m1):
    config, _ = finished
    argv = ["eval", "--run", config.output_dir, "--step", "1", "--lm-eval", "toy_addition", "--num-fewshot", "0",
            "--lm-eval-include", str(TASKS), "--lm-eval-include-only", "--lm-eval-batch-size", "8",
            "--lm-eval-samples", "--quiet"]
    assert main(argv) == 0
    result = json.loads((Path(config.output_dir) / "eval" / "lm-eval-toy_addition-M1.json").read_text())
    from importlib.metadata import version

    import lm_eval  # noqa: F401 - the version below is the installed harness's

    assert result["lm_eval_version"] == version("lm_eval")
    (call,) = result["calls"]
    samples = call["samples"]["toy_addition"]
    docs = [json.loads(line) for line in (TASKS / "toy_addition.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    tokenizer = load_tokenizer("tiny")
    right, moved = 0, 0.0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        ours = [_loglikelihood(m1, tokenizer, doc["question"], c) for c in doc["choices"]]
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        with m1.disable_adapter():
            base = [_loglikelihood(m1, tokenizer, doc["question"], c) for c in doc["choices"]]
        moved = max(moved, max(abs(a - b) for a, b in zip(ours, base, strict=True)))
        right += max(range(len(ours)), key=ours.__getitem__) == doc["label"]
    assert moved > 1e-3  # the adapters were active: M_1 is not S
    assert call["results"]["toy_addition"]["acc,none"] == pytest.approx(right / len(docs))


def test_h4_preset_is_one_call_per_shot_count():
    name, tasks = parse_tasks("h4", None)
    assert name == "h4" and tasks == PRESETS["h4"]
    assert calls(tasks) == [(25, ["arc_challenge"]), (10, ["hellaswag"]), (5, ["mmlu"]), (0, ["truthfulqa_mc2"])]
    assert {t.name: t.metric for t in tasks} == {
        "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc", "truthfulqa_mc2": "acc"
    }
    assert calls(parse_tasks("a,b", 3)[1]) == [(3, ["a", "b"])]


def test_bad_eval_input_is_one_line_and_exit_2(finished, tmp_path, capsys):
    config, _ = finished
    assert main(["eval", "--run", config.output_dir]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["eval", "--run", config.output_dir, "--step", "7", "--data", config.steps.split(",")[0]]) == 2
    assert "--step 7: not a finished step" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path), "--data", config.steps.split(",")[0]]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert main(["eval", "--run", config.output_dir, "--lm-eval", "h4", "--num-fewshot", "3"]) == 2
    assert "drop --num-fewshot" in capsys.readouterr().err
