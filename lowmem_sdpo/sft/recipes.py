"""SFT recipes (`lowmem-sdpo sft --recipe NAME`): a base model, data with documented sizes, settings.

solar-10.7b-sft rebuilds the paper's S, which was never released: SOLAR-10.7B-v1.0 SFT'd on the data the
SOLAR-10.7B-Instruct-v1.0 card names for its SFT stage, minus the in-house Metamath set (not public):
  c-s-ale/alpaca-gpt4-data   all 52,002 rows (instruction, input, output)
  Open-Orca/OpenOrca         a seeded sample of 50,000 rows (system_prompt, question, response); the full set
                             is 4.2M rows, far more than a one-GPU SFT of S needs
QLoRA settings after the alignment-handbook's Zephyr SFT QLoRA recipe (lr 2e-4, cosine, 10% warm-up, one
epoch, LoRA r 16 / alpha 16 / dropout 0.05, effective batch 16), max length 2048 / prompt 1024.
This module is plain data. The recipe's run directory is the one the `solar-10.7b-sft` model alias points into
(model_aliases.SOLAR_SFT_RUN_DIR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowmem_sdpo.model_aliases import SOLAR_SFT_RUN_DIR


@dataclass(frozen=True)
class SftRecipe:
    name: str
    model: str
    data: str  # the --data spec
    limits: dict[str, int]  # data item -> rows kept (seeded sample); items not named are kept whole
    output_dir: str
    settings: dict[str, Any] = field(default_factory=dict)


SOLAR_SFT = SftRecipe(
    name="solar-10.7b-sft",
    model="solar-10.7b",
    data="c-s-ale/alpaca-gpt4-data:train,Open-Orca/OpenOrca:train",
    limits={"Open-Orca/OpenOrca:train": 50_000},
    output_dir=SOLAR_SFT_RUN_DIR,
    settings={
        "learning_rate": 2e-4,
        "epochs": 1.0,
        "batch_size": 4,
        "grad_accum": 4,
        "warmup_ratio": 0.1,
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "max_length": 2048,
        "max_prompt_length": 1024,
    },
)

SFT_RECIPES: dict[str, SftRecipe] = {r.name: r for r in (SOLAR_SFT,)}
