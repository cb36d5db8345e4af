"""The data layer's records: normalised examples (before tokenization) and their token ids (after)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class PreferencePair:
    prompt: list[Message]  # the conversation before the answer
    chosen: str
    rejected: str


@dataclass
class UnpairedExample:
    prompt: list[Message]
    completion: str
    label: bool  # True = desirable


@dataclass
class StepData:
    """One sDPO step's data D_t, normalised. Exactly one of `pairs` / `unpaired` is filled."""

    label: str  # what the user wrote for this step, plus "[j/k]" for a part of a split source
    source: str  # the file or hub id (with split) the rows came from
    schema: str  # the recognised schema name, e.g. "standard", "conversational", "helpsteer"
    pairs: list[PreferencePair] = field(default_factory=list)
    unpaired: list[UnpairedExample] = field(default_factory=list)
    n_source_rows: int = 0  # rows of the source assigned to this step, before drops
    drops: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped while normalising

    def fingerprint(self) -> str:
        """sha256 of the normalised content only, so a cache survives renaming or moving the file."""
        content: dict[str, Any] = {
            "pairs": [asdict(p) for p in self.pairs],
            "unpaired": [asdict(u) for u in self.unpaired],
        }
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # end with EOS unless the answer was truncated (then it does not end)
    rejected_ids: list[int]


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass
class TokenizedStep:
    pairs: list[TokenizedPair]
    unpaired: list[TokenizedExample]
    stats: dict[str, Any]
    settings: dict[str, Any]
