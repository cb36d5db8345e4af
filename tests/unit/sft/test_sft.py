"""SFT: the loss is minus the mean answer-token log-prob (prompt masked), checked against float64 references;
`lowmem-sdpo sft` reads the three row layouts and exports S as a checkpoint `--model` accepts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowmem_sdpo.cli import main
from lowmem_sdpo.data import StepData, UnpairedExample, load_tokenizer, tokenize_step
from lowmem_sdpo.models import add_lora, dequantize_weight, load_quantized, resolve_model
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.sft.loss import answer_tokens, collate_examples, sft_loss_part
from tests.support.model_fixtures import CPU_QUANT, load_fp32, write_llama

CPU = Hardware(device=torch.device("cpu"), compute_dtype="float32")
ROWS = [
    ("1+2=", "3"),
    ("What is seven plus eight?", "It is 15, as 7 + 8 = 15."),
    ("9+9=", "18"),
    ("Add 40 and 2.", "42"),
    ("0+0=", "0"),
]


def _examples(tokenizer):
    step = StepData(
        "sft", "test", "sft", unpaired=[UnpairedExample([{"role": "user", "content": p}], a, True) for p, a in ROWS]
    )
    return tokenize_step(step, tokenizer, max_length=64, max_prompt_length=48).unpaired


def _reference_loss(model: torch.nn.Module, examples) -> float:
    """-(sum of answer-token log-probs) / (answer tokens), each sequence alone, in float64."""
    model = copy.deepcopy(model).double().eval()
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            start = len(e.prompt_ids)
            for j, token in enumerate(e.completion_ids):
                total += logp[start + j - 1, token]  # position t predicts token t + 1
            tokens += len(e.completion_ids)
    return float(-total / tokens)


def test_sft_loss_equals_a_float64_reference(tmp_path):
    model_dir = write_llama(tmp_path / "m", dtype=torch.float32, with_tokenizer=True)
    tokenizer = load_tokenizer(str(model_dir))
    examples = _examples(tokenizer)
    policy = add_lora(load_fp32(model_dir), r=4, alpha=8, dropout=0.0, seed=0)
    with torch.no_grad():  # B = 0 would leave the adapter out of the loss: give it a value
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    window = [examples[:2], examples[2:]]  # two micro-batches of different widths: padding on the right
    total = answer_tokens(examples)
    loss = sum(
        float(sft_loss_part(policy, collate_examples(mb, tokenizer.pad_token_id), total, hw=CPU, impl="torch")[0].detach())
        for mb in window
    )
    reference = _reference_loss(policy.merge_and_unload(), examples)
    assert loss == pytest.approx(reference, abs=1e-5)


def _dequantised_reference_model(model_dir, tmp_path):
    """S as the 4-bit path sees it (block linears NF4 -> dense), everything else as stored."""
    quantized = load_quantized(model_dir, quant=CPU_QUANT)
    dense = load_fp32(model_dir)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            twin = modules.get(name)
            if isinstance(module, torch.nn.Linear) and twin is not None and hasattr(twin.weight, "quant_state"):
                module.weight.copy_(dequantize_weight(twin.weight).float())
    return dense


def test_sft_command_reads_three_layouts_and_exports_s(tmp_path):
    model_dir = write_llama(tmp_path / "base", dtype=torch.float32, with_tokenizer=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "pc.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in ROWS[:2]))
    (data / "conv.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n"
            for p, a in ROWS[2:4]
        )
    )
    p, a = ROWS[4]
    (data / "pref.jsonl").write_text(json.dumps({"prompt": p, "chosen": a, "rejected": "7"}) + "\n")
    out = tmp_path / "sft"
    spec = ",".join(str(data / f) for f in ("pc.jsonl", "conv.jsonl", "pref.jsonl"))
    # one optimiser step over all five rows (3 + 2 in two micro-batches): its logged loss is S's loss
    args = ["sft", "--model", str(model_dir), "--data", spec, "--output-dir", str(out), "--batch-size", "3",
            "--grad-accum", "2", "--lora-dropout", "0", "--device", "cpu", "--no-gradient-checkpointing",
            "--max-length", "64", "--max-prompt-length", "48", "--logprob-impl", "torch", "--quiet"]  # fmt: skip
    assert main(args) == 0
    first = json.loads((out / "train" / "metrics.jsonl").read_text().splitlines()[0])
    examples = _examples(load_tokenizer(str(model_dir)))
    assert first["answer_tokens"] == answer_tokens(examples)
    assert first["loss"] == pytest.approx(_reference_loss(_dequantised_reference_model(model_dir, tmp_path), examples), abs=1e-5)
    s_dir = resolve_model(str(out / "model"))  # what --model accepts
    config = json.loads((s_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and (s_dir / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 5 and summary["optimizer_steps"] == 1
    # a second run over the finished directory is refused, --resume reports it done
    assert main(args) == 2
    assert main([*args, "--resume"]) == 0
