"""Data layer: step specs -> normalised examples per sDPO step -> token ids -> padded batches.

steps = load_steps("examples/data/toy_step1.jsonl,ultrafeedback@2", seed=0)
tokenizer = load_tokenizer("tiny")
tokenized = tokenize_step(steps[0], tokenizer, max_length=1024, max_prompt_length=512)
batch = collate_pairs(tokenized.pairs[:8], tokenizer.pad_token_id)

The names below are imported on first use (PEP 562): the torch-free modules (spec, types, aliases) are then
importable by the CLI without torch or datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# name -> the module that defines it
_HOMES: dict[str, str] = {
    "DATASET_ALIASES": "aliases",
    "IGNORE_INDEX": "collate",
    "collate_pairs": "collate",
    "collate_unpaired": "collate",
    "pad_rows": "collate",
    "load_steps": "loading",
    "parse_columns": "loading",
    "tokenize_step": "tokenize",
    "load_tokenizer": "tokenizer",
    "PreferencePair": "types",
    "StepData": "types",
    "TokenizedExample": "types",
    "TokenizedPair": "types",
    "TokenizedStep": "types",
    "UnpairedExample": "types",
}
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lowmem_sdpo.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lowmem_sdpo.data.{home}"), name)
