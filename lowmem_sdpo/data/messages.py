"""A conversation given as a list of {role, content} messages, as the SFT rows and the prompts files of
`generate` / `self-reward` carry it: one check and one error text for both. (The preference layouts check their
message columns in data/schemas.py, with that loader's column wording.)"""

from __future__ import annotations

from typing import Any

from lowmem_sdpo.data.types import Message

ROLES = ("system", "user", "assistant")


class MessageError(ValueError):
    """`field` of a row is not a message list; the caller adds the file and row."""


def message_list(value: Any, field: str) -> list[Message]:
    """`value` as a non-empty list of messages, each copied down to its role and content."""
    if not isinstance(value, list) or not value:
        raise MessageError(f"field '{field}' must be a non-empty list of {{role, content}} messages")
    out: list[Message] = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MessageError(f"field '{field}' message {i}: expected {{role: {'|'.join(ROLES)}, content: str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out
