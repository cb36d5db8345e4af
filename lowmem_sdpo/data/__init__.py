"""Data layer: step specs -> normalised examples per sDPO step -> token ids -> padded batches.

steps = load_steps("examples/data/toy_step1.jsonl,ultrafeedback@2", seed=0)
tokenizer = load_tokenizer("tiny")
tokenized = tokenize_step(steps[0], tokenizer, max_length=1024, max_prompt_length=512)
batch = collate_pairs(tokenized.pairs[:8], tokenizer.pad_token_id)
"""

from lowmem_sdpo.data.aliases import DATASET_ALIASES
from lowmem_sdpo.data.collate import IGNORE_INDEX, collate_pairs, collate_unpaired, pad_rows
from lowmem_sdpo.data.loading import load_steps, parse_columns
from lowmem_sdpo.data.tokenize import tokenize_step
from lowmem_sdpo.data.tokenizer import load_tokenizer
from lowmem_sdpo.data.types import (
    PreferencePair,
    StepData,
    TokenizedExample,
    TokenizedPair,
    TokenizedStep,
    UnpairedExample,
)

__all__ = [
    "DATASET_ALIASES",
    "IGNORE_INDEX",
    "PreferencePair",
    "StepData",
    "TokenizedExample",
    "TokenizedPair",
    "TokenizedStep",
    "UnpairedExample",
    "collate_pairs",
    "collate_unpaired",
    "load_steps",
    "load_tokenizer",
    "pad_rows",
    "parse_columns",
    "tokenize_step",
]
