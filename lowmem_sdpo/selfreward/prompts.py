"""The prompts file of `generate` and `self-reward`: JSON Lines with a `prompt` per row (a string, one user
turn, or a list of {role, content} messages), or plain text with one prompt per non-empty line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_sdpo.data.messages import MessageError, message_list
from lowmem_sdpo.data.sources import read_jsonl
from lowmem_sdpo.data.types import Message
from lowmem_sdpo.errors import InputError


def _messages(path: Path, where: str, value: Any) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{path}: {where}: field 'prompt' is empty (expected a non-empty prompt)")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}: {where}: field 'prompt' must be a string or a non-empty list of messages")
    try:
        out = message_list(value, "prompt")
    except MessageError as err:
        raise InputError(f"{path}: {where}: {err}") from err
    if out[-1]["role"] == "assistant":
        raise InputError(
            f"{path}: {where}: field 'prompt' ends with an assistant message; expected a request"
        )
    return out


def read_prompts(path: str | Path) -> list[list[Message]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file")
    if path.suffix in (".txt", ".text"):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [[{"role": "user", "content": line}] for line in lines]
    else:
        source = read_jsonl(path)
        prompts = []
        for i, row in enumerate(source.rows):
            if "prompt" not in row:
                raise InputError(f"{path}: {source.where(i)}: no field 'prompt' (expected a prompt per row)")
            prompts.append(_messages(path, source.where(i), row["prompt"]))
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts in the file")
    return prompts
