"""Fingerprints that decide whether a cache or a resumed run is still valid: the tokenised units (every id),
the tokenizer's files, the chat template, and the hub commit a model resolved to.

A reference cache computed with another tokenizer or template is wrong by several nats per sequence, and
nothing else in the key would notice a hand-edited `tokenizer_config.json`: so all of these are keyed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowmem_sdpo.engine.units import Unit
from lowmem_sdpo.models.export import TOKENIZER_FILES


def _ids(digest: Any, ids: list[int]) -> None:
    # Length first, so that ([1, 2], [3]) and ([1], [2, 3]) differ.
    digest.update(struct.pack(f"<q{len(ids)}q", len(ids), *ids))


def units_digest(units: Iterable[Unit]) -> str:
    """sha256 over every token id of every unit, in order (prompts and answers, both sides)."""
    digest = hashlib.sha256()
    for unit in units:
        for ids in (unit.chosen_prompt, unit.chosen, unit.rejected_prompt, unit.rejected):
            _ids(digest, ids)
    return digest.hexdigest()


def tokenizer_fingerprint(model_dir: Path, tokenizer: Any) -> dict[str, str]:
    """{"files": sha256 of the tokenizer files present, "chat_template": sha256 of the template in use}."""
    files = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            files.update(name.encode() + b"\0")
            files.update(path.read_bytes())
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = repr(sorted(template.items()))
    return {
        "files": files.hexdigest(),
        "chat_template": hashlib.sha256(str(template).encode()).hexdigest(),
    }


def hub_commit(model_dir: Path) -> str | None:
    """The commit a hub snapshot directory holds (HF cache layout: .../snapshots/<commit>), else None."""
    model_dir = Path(model_dir)
    if model_dir.parent.name == "snapshots" and len(model_dir.name) == 40:
        return model_dir.name
    return None
