"""Loading a tokenizer and turning a prompt conversation into prompt token ids.

The prompt goes through the tokenizer's own chat template with the generation prompt, so training sees
exactly what inference will. Tokenizers without a template get SOLAR's plain `### User:` / `### Assistant:`
layout instead, announced once per tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir
from lowmem_sdpo.data.types import Message
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.model_aliases import resolve_model_alias

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_TOKENIZERS = {"builtin:tiny": bundled_tokenizer_dir}

FALLBACK_HEADERS: dict[str, str] = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
}
FALLBACK_GENERATION_PROMPT = "### Assistant:\n"

_announced_fallback: set[str] = set()


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """'tiny' (or any alias) -> its tokenizer; a hub id or local dir -> AutoTokenizer.from_pretrained.

    When the tokenizer has no pad token, EOS doubles as padding (on this instance only): collation needs a
    pad id, and padded positions are masked out of both attention and labels anyway.
    """
    from transformers import AutoTokenizer

    target = resolve_model_alias(model)
    location = str(BUILTIN_TOKENIZERS[target]()) if target in BUILTIN_TOKENIZERS else target
    if location.startswith(("/", ".", "~")):  # a path, not a hub id: say so plainly when it is not there
        location = str(Path(location).expanduser())
        if not Path(location).exists():
            raise InputError(f"--model {model}: directory {location} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load a tokenizer for model '{model}': {reason}") from err
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer of model '{model}' has no EOS token; answers must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text up to and including the assistant header the answer follows."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _announced_fallback:
        _announced_fallback.add(name)
        log.warning(
            "tokenizer %s has no chat template; using the plain '### User:' / '### Assistant:' format", name
        )
    body = "".join(
        f"{FALLBACK_HEADERS[m['role']]}{m['content']}\n\n"
        for m in messages
        if m["content"] or m["role"] != "system"
    )
    return body + FALLBACK_GENERATION_PROMPT


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of plain text when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


def encode_texts(tokenizer: Any, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    """Plain ids (no special tokens), encoded in batches: a fast tokenizer runs a batch in parallel, which
    matters for 60K-pair datasets."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        ids += [
            list(x) for x in tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
        ]
    return ids


def encode_prompts(tokenizer: Any, conversations: list[list[Message]], *, bos: bool) -> list[list[int]]:
    """Prompt ids with exactly one BOS when the tokenizer uses one: templates that already write BOS
    (Llama-3, Zephyr) keep theirs and get no second one."""
    encoded = encode_texts(tokenizer, [render_prompt(tokenizer, m) for m in conversations])
    if bos:
        encoded = [
            ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *ids] for ids in encoded
        ]
    return encoded


def encode_answers(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Answer ids followed by EOS (not doubled when the text already ends with it)."""
    eos = tokenizer.eos_token_id
    return [ids if ids[-1:] == [eos] else [*ids, eos] for ids in encode_texts(tokenizer, texts)]
