"""Batching tokenized examples into right-padded tensors with HF-style (unshifted) labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowmem_sdpo.data.types import TokenizedExample, TokenizedPair

IGNORE_INDEX = -100


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """rows = (prompt_ids, answer_ids); labels copy the answer tokens only (prompt and padding -100)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, n_prompt:n] = torch.tensor(answer, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """[2B, T]: rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones, in the same order."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return pad_rows(rows, pad_id)


def collate_unpaired(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """[B, T] plus "label" (bool [B], True = desirable)."""
    batch = pad_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch
