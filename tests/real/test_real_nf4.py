"""The real tier, part 2: SmolLM2-135M-Instruct in NF4 through our log-prob path, a 2-step sDPO run, and the
commands that read a run (generate, export, eval --lm-eval), each against an independent computation.

Independent: transformers' bitsandbytes NF4 load (tests/support/real_smollm2.py) scored by its full-vocabulary
forward; peft's own LoRA layers for the trained adapters; peft's merge of S's fp32 weights for the export.
The head is tied (lm_head is the embedding matrix): the fused log-prob kernels read it as the head.
Data: the first 8 of the bundled chat pairs, 4 per step; sequences under 64 tokens.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.cli import main
from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.reference.logps import KEY_METADATA, compute_logps, load_cache
from lowmem_sdpo.engine.rundir.layout import REFERENCE_CACHE, step_dir
from lowmem_sdpo.engine.rundir.metrics import read_summary
from lowmem_sdpo.engine.units import build_units
from lowmem_sdpo.models import QuantSettings, load_quantized, resolve_model
from lowmem_sdpo.models.resolve import tokenizer_location
from lowmem_sdpo.runtime.hardware import Hardware, resolve_logprob_impl
from lowmem_sdpo.runtime.reporting import Reporter
from tests.support.engine_fixtures import reference_table
from tests.support.real_smollm2 import (
    ALIAS,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    REPO,
    independent_nf4,
    pairs_slice,
    sequence_logp,
    skip_without_package,
    unit_logps,
)

pytestmark = pytest.mark.real

CPU = Hardware(torch.device("cpu"), "float32")
TASKS = REPO / "tests" / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    skip_without_package()
    return resolve_model(ALIAS)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("real-data")
    return [pairs_slice(tmp / "s1.jsonl", 0, 4), pairs_slice(tmp / "s2.jsonl", 4, 4)]


def units_of(path: Path) -> list:
    tokenized = tokenize_step(
        load_steps(str(path))[0],
        load_tokenizer(tokenizer_location(ALIAS)),
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
    )
    return build_units(tokenized, seed=0, label="real")[0]


@pytest.fixture(scope="module")
def independent(model_dir):
    return independent_nf4(model_dir)


@pytest.fixture(scope="module")
def ours(model_dir):
    return load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))  # repacking off (issue 22)


@contextlib.contextmanager
def with_adapters(model: torch.nn.Module, adapters: list[Path]) -> Iterator[torch.nn.Module]:
    """`model` with peft's LoRA layers of every adapter active; the bare model is given back afterwards."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    policy = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        policy.load_adapter(str(path), adapter_name=name)
    policy.base_model.set_adapter(names)
    try:
        yield policy.eval()
    finally:
        policy.unload()


def assert_close(table, expected: tuple[list[float], list[float]], tol: float) -> None:
    for side, values in zip(("chosen", "rejected"), expected, strict=True):
        diff = (getattr(table, side).double() - torch.tensor(values, dtype=torch.float64)).abs().max()
        assert float(diff) <= tol, (side, float(diff))


@pytest.fixture(scope="module")
def s_on_step1(independent, data) -> tuple[list[float], list[float]]:
    """S's per-sequence log-probs of step 1's pairs, from the independent NF4 forward."""
    return unit_logps(independent, units_of(data[0]))


# Interpreted Triton walks the 49,152-word vocabulary tile by tile in numpy: two pairs keep it to seconds.
@pytest.mark.parametrize(("impl", "n"), [("torch", 4), ("naive", 4), ("triton", 2)])
def test_nf4_logprobs_equal_transformers_bitsandbytes(ours, s_on_step1, data, impl, n):
    units = units_of(data[0])[:n]
    table = compute_logps(
        ours, units, pad_id=load_tokenizer(tokenizer_location(ALIAS)).pad_token_id, batch_size=4, hw=CPU,
        impl=resolve_logprob_impl(CPU, impl), with_kl=False, reporter=Reporter(True), description="x",
    )  # fmt: skip
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight  # the tied head
    assert_close(table, tuple(side[:n] for side in s_on_step1), 1e-4)


@pytest.fixture(scope="module")
def two_steps(model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real-run") / "run"
    argv = ["run", "--model", ALIAS, "--steps", f"{data[0]},{data[1]}", "--output-dir", str(out),
            "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH),
            "--batch-size", "2", "--grad-accum", "1", "--learning-rate", "1e-4", "--warmup-ratio", "0",
            "--lora-r", "8", "--lora-dropout", "0", "--no-gradient-checkpointing", "--device", "cpu",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out


def cached(out: Path, t: int):
    from safetensors import safe_open

    path = step_dir(out, t) / REFERENCE_CACHE
    with safe_open(str(path), framework="pt") as f:
        key = f.metadata()[KEY_METADATA]
    table = load_cache(path, key, need_kl=False)
    assert table is not None
    return table


def chain(out: Path, t: int) -> list[Path]:
    return [out / c for c in (read_summary(step_dir(out, t)) or {})["adapter_chain"]]


def test_run_references_are_s_then_the_trained_p1(two_steps, ours, independent, s_on_step1, data):
    # step 1: M_0 = S, against the independent NF4 forward
    assert_close(cached(two_steps, 1), s_on_step1, 1e-4)
    # step 2: M_1 = Q(S) + step 1's adapter as a frozen delta equals the trained P_1 through peft's layers
    units = units_of(data[1])
    (adapter,) = chain(two_steps, 1)
    step2 = cached(two_steps, 2)
    with with_adapters(ours, [adapter]) as p1:
        trained = reference_table(p1, units, load_tokenizer(tokenizer_location(ALIAS)).pad_token_id)
    for side in ("chosen", "rejected"):
        assert float((getattr(step2, side) - getattr(trained, side)).abs().max()) <= 1e-5, side
    with with_adapters(independent, [adapter]) as p1:
        assert_close(step2, unit_logps(p1, units), 1e-4)
    base = unit_logps(independent, units)
    assert float((step2.chosen.double() - torch.tensor(base[0], dtype=torch.float64)).abs().max()) > 1e-3


def test_generate_from_the_run_stops_at_end_of_turn(two_steps, tmp_path):
    prompts = tmp_path / "prompts.txt"
    # Questions S in NF4 answers in one short sentence (to "What is the capital of France?" it goes on about
    # the City of Light); the run's small steps (learning rate 1e-4) keep M_2 close to S.
    prompts.write_text(
        "What is the capital of Japan?\nWhich month comes after March?\n"
        "What is the plural of mouse?\nWhat is 12 times 3?\n"
    )
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--run", str(two_steps), "--prompts", str(prompts), "-n", "1", "--temperature", "0",
            "--max-new-tokens", "32", "--batch-size", "4", "--device", "cpu", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        (text,) = row["candidates"]
        assert row["stopped"] == [True], row  # ended at <|im_end|>, not cut by --max-new-tokens
        assert text.strip() and "<|im_" not in text and "<|endoftext|>" not in text, row


def test_export_equals_s_plus_the_adapters_merged_by_peft(two_steps, model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m2"
    assert main(["export", "--run", str(two_steps), "--out", str(out), "--dtype", "float32", "--quiet"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for adapter in chain(two_steps, 2):
        reference = PeftModel.from_pretrained(reference, str(adapter)).merge_and_unload()
    reference.eval()
    units = units_of(data[1])[:2]
    ours_logps, theirs = unit_logps(exported, units), unit_logps(reference, units)
    for a, b in zip(ours_logps, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert max(abs(a - b) for a, b in zip(unit_logps(base, units)[0], ours_logps[0], strict=True)) > 1e-3


def test_lm_eval_on_the_local_task_equals_peft(two_steps, independent):
    argv = ["eval", "--run", str(two_steps), "--step", "1", "--lm-eval", "toy_addition", "--num-fewshot", "0",
            "--lm-eval-include", str(TASKS), "--lm-eval-include-only", "--lm-eval-batch-size", "8",
            "--lm-eval-samples", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((two_steps / "eval" / "lm-eval-toy_addition-M1.json").read_text())
    (call,) = result["calls"]
    samples = call["samples"]["toy_addition"]
    docs = [json.loads(line) for line in (TASKS / "toy_addition.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(tokenizer_location(ALIAS))
    right = 0
    with with_adapters(independent, chain(two_steps, 1)) as p1:
        for sample in samples:
            doc = docs[sample["doc_id"]]
            ours = []
            for choice in doc["choices"]:
                # as the harness tokenises: the whole string, minus the context's ids (no BOS: this
                # tokenizer adds none)
                whole = tokenizer(doc["question"] + choice)["input_ids"]
                context = len(tokenizer(doc["question"])["input_ids"])
                ours.append(sequence_logp(p1, whole[:context], whole[context:]))
            theirs = [resp[0] for resp in sample["filtered_resps"]]
            assert theirs == pytest.approx(ours, abs=1e-3)
            right += max(range(len(ours)), key=ours.__getitem__) == doc["label"]
    assert call["results"]["toy_addition"]["acc,none"] == pytest.approx(right / len(docs))


def test_sft_first_loss_is_s_answer_nll(independent, data, tmp_path):
    """Two optimiser steps of `sft` on 4 pairs' chosen answers (batch 2 x 2 micro-batches, 2 epochs): the first
    step's logged loss is S's mean answer-token NLL over all 4, from the independent NF4 forward."""
    out = tmp_path / "sft"
    argv = ["sft", "--model", ALIAS, "--data", str(data[0]), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "2", "--epochs", "2", "--lora-r", "8", "--lora-dropout", "0", "--device", "cpu",
            "--no-gradient-checkpointing", "--max-length", str(MAX_LENGTH),
            "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    units = units_of(data[0])
    nll = -sum(sequence_logp(independent, u.chosen_prompt, u.chosen) for u in units)
    tokens = sum(len(u.chosen) for u in units)
    assert metrics[0]["answer_tokens"] == tokens
    assert metrics[0]["loss"] == pytest.approx(nll / tokens, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and (out / "model" / "config.json").is_file()
