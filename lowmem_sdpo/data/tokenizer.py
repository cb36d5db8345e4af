"""Loading a tokenizer and turning conversations into token ids as the model sees them.

Prompt: the conversation rendered by the tokenizer's own chat template with the generation prompt, so
training sees exactly what inference feeds the model. Answer: what follows those prompt ids when the whole
conversation, answer included, is rendered by the template and tokenised in one piece, so the answer's first
token is the one the model writes after the prompt (`Hello`, not the `▁Hello` a separate encoding would give
with a SentencePiece tokenizer). The answer ends with the template's end-of-turn marker (`<|im_end|>`,
`<end_of_turn>`, ...) or with EOS where the template writes none. Tokenizers without a template get SOLAR's
plain `### User:` / `### Assistant:` layout instead, announced once per tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir
from lowmem_sdpo.data.types import Message
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.hub import LOCAL_MODEL_HINT, hub_reachable, unreachable
from lowmem_sdpo.model_aliases import resolve_model_alias

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# Built-in models whose tokenizer ships with this package. Another built-in model's tokenizer comes out of
# building the model (smollm2's GGUF build): models.resolve.tokenizer_location gives its directory.
BUILTIN_TOKENIZERS = {
    "builtin:tiny": bundled_tokenizer_dir,
    "builtin:tiny-carry": bundled_tokenizer_dir,
}
BUILTIN_PREFIX = "builtin:"

FALLBACK_HEADERS: dict[str, str] = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
}
FALLBACK_GENERATION_PROMPT = "### Assistant:\n"

# The probe answer whose surroundings reveal what a template writes after an assistant message.
PROBE_ANSWER = "LOWMEM_SDPO_PROBE_ANSWER"

_announced_fallback: set[str] = set()


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """'tiny' (or an alias of a hub model) -> its tokenizer; a hub id or local dir -> AutoTokenizer.from_pretrained.
    A built-in model built on first use (smollm2-135m-instruct-q4): pass its directory,
    models.resolve.tokenizer_location(model) (the data layer builds no model).

    When the tokenizer has no pad token, EOS doubles as padding (on this instance only): collation needs a
    pad id, and padded positions are masked out of both attention and labels anyway.
    """
    from transformers import AutoTokenizer

    target = resolve_model_alias(model)
    if target in BUILTIN_TOKENIZERS:
        location = str(BUILTIN_TOKENIZERS[target]())
    elif target.startswith(BUILTIN_PREFIX):
        raise InputError(
            f"model '{model}': a built-in model built on first use; load its tokenizer from its directory "
            "(lowmem_sdpo.models.resolve.tokenizer_location)"
        )
    else:
        location = target
    if location.startswith(("/", ".", "~")):  # a path, not a hub id: say so plainly when it is not there
        location = str(Path(location).expanduser())
        if not Path(location).exists():
            raise InputError(f"--model {model}: directory {location} does not exist")
    online = Path(location).is_dir() or hub_reachable()  # a hub id offline: the cache only, no retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=not online)
    except (OSError, ValueError, KeyError) as err:
        if not online:
            raise unreachable(f"model '{model}'", LOCAL_MODEL_HINT.format(repo_id=location)) from err
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load a tokenizer for model '{model}': {reason}") from err
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer of model '{model}' has no EOS token; answers must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def render_conversation(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The conversation as text: through the chat template, or the plain fallback layout without one.

    With add_generation_prompt the text ends with the assistant header the answer follows (a prompt);
    without it a conversation ending with an assistant message renders that answer and what closes it.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    name = _tokenizer_name(tokenizer)
    if name not in _announced_fallback:
        _announced_fallback.add(name)
        log.warning(
            "tokenizer %s has no chat template; using the plain '### User:' / '### Assistant:' format", name
        )
    # Every turn, an answer included, ends with a blank line: plain text, so an answer ends with EOS.
    body = "".join(
        f"{FALLBACK_HEADERS[m['role']]}{m['content']}\n\n"
        for m in messages
        if m["content"] or m["role"] != "system"
    )
    return body + (FALLBACK_GENERATION_PROMPT if add_generation_prompt else "")


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text up to and including the assistant header the answer follows."""
    return render_conversation(tokenizer, messages, add_generation_prompt=True)


def with_answer(messages: list[Message], answer: str) -> list[Message]:
    return [*messages, {"role": "assistant", "content": answer}]


@dataclass(frozen=True)
class AnswerEnd:
    """What closes an answer: the template's own end-of-turn text, or EOS where the template has none.

    `text` is what the template writes after an assistant message cut after its last special token
    (ChatML `<|im_end|>\\n` -> `<|im_end|>`): generation stops at that token, so the newline after it is
    never produced by the model and is not trained on. Empty when the template writes no special token
    there (SOLAR writes nothing, the tiny template a blank line): the answer then gets EOS appended.
    """

    text: str
    template_tail: str  # everything the template writes after an assistant message's content

    @property
    def uses_eos(self) -> bool:
        return not self.text

    @property
    def label(self) -> str:
        """For reports: the end marker's text, or "eos"."""
        return "eos" if self.uses_eos else self.text


def special_token_texts(tokenizer: Any) -> set[str]:
    """The texts of every special token: the named ones (BOS, EOS, ...) and added tokens flagged special."""
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    return {t for t in texts if t}


def find_answer_end(tokenizer: Any) -> AnswerEnd:
    """Render a probe conversation and read what the template writes after the assistant's message."""
    probe = with_answer([{"role": "user", "content": "?"}], PROBE_ANSWER)
    rendered = render_conversation(tokenizer, probe, add_generation_prompt=False)
    at = rendered.rfind(PROBE_ANSWER)
    if at < 0:
        raise InputError(
            f"the chat template of {_tokenizer_name(tokenizer)} does not write the assistant's message; "
            "it cannot be used to train on answers"
        )
    tail = rendered[at + len(PROBE_ANSWER) :]
    cut = max((tail.rfind(t) + len(t) for t in special_token_texts(tokenizer) if t in tail), default=0)
    return AnswerEnd(text=tail[:cut], template_tail=tail)


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


def encode_sequences(tokenizer: Any, texts: list[str], *, bos: bool) -> list[list[int]]:
    """Ids with exactly one BOS when the tokenizer uses one: text the template already starts with BOS
    (Gemma, Llama-3, Zephyr) keeps it and gets no second one."""
    encoded = encode_texts(tokenizer, texts)
    if not bos:
        return encoded
    first = tokenizer.bos_token_id
    return [ids if ids[:1] == [first] else [first, *ids] for ids in encoded]


@dataclass(frozen=True)
class RenderedPrompt:
    messages: list[Message]
    text: str  # rendered with the generation prompt
    ids: list[int]  # what inference feeds the model; shared by every answer to this prompt


def encode_prompts(tokenizer: Any, conversations: list[list[Message]], *, bos: bool) -> list[RenderedPrompt]:
    texts = [render_prompt(tokenizer, m) for m in conversations]
    ids = encode_sequences(tokenizer, texts, bos=bos)
    return [RenderedPrompt(m, t, i) for m, t, i in zip(conversations, texts, ids, strict=True)]


@dataclass(frozen=True)
class EncodedAnswer:
    ids: list[int]  # the answer's tokens and its end marker (or EOS)
    boundary_merge: bool  # the joint encoding did not start with the prompt ids (see split_after_prompt)
    template_mismatch: bool  # the template's full rendering did not extend the rendered prompt


def answer_text(tokenizer: Any, prompt: RenderedPrompt, answer: str, end: AnswerEnd) -> tuple[str, bool]:
    """The text that follows the rendered prompt for this answer, through its end marker; and whether the
    template's rendering of the whole conversation failed to extend the prompt's rendering.

    The answer is taken from the template's own rendering of the conversation, so what a template does to an
    assistant message (Gemma's and Llama-3's trim it) is what is trained on.
    That rendering is expected to be the prompt's text, then the answer, then the template's tail; where a
    template breaks this (one whose generation prompt differs from its assistant header), the answer text is
    placed after the prompt as it is.
    """
    full = render_conversation(tokenizer, with_answer(prompt.messages, answer), add_generation_prompt=False)
    tail = end.template_tail
    if full.startswith(prompt.text) and full.endswith(tail) and len(full) >= len(prompt.text) + len(tail):
        return full[len(prompt.text) : len(full) - len(tail)] + end.text, False
    return answer + end.text, True


def split_after_prompt(prompt_ids: list[int], joint_ids: list[int]) -> tuple[list[int], bool]:
    """The answer's ids out of the joint encoding of prompt + answer, and whether the tokenizer merged
    tokens across the boundary.

    Normally the joint ids start with the prompt ids and the answer is the rest. When they do not (a prompt
    ending in a space or a newline whose token merges with the answer's first characters, `▁` + `Hello` ->
    `▁Hello`), the prompt ids are kept as they are, since they are what inference feeds the model and chosen
    and rejected must share them, and the answer is the joint encoding from the first token where it departs
    from the prompt ids. Every answer id is then one the tokenizer writes for this very text and no answer
    character is lost; the cost is that the prompt's departing stretch (usually its last token, the space or
    newline) is covered twice: the model learns to write `▁Hello` after a prompt ending in `▁`.
    """
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        return joint_ids[len(prompt_ids) :], False
    return joint_ids[common_prefix_length(prompt_ids, joint_ids) :], True


def common_prefix_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def encode_answers(
    tokenizer: Any, requests: list[tuple[RenderedPrompt, str]], *, end: AnswerEnd, bos: bool
) -> list[EncodedAnswer]:
    """Each (prompt, answer) rendered as one conversation and tokenised jointly; the answer's ids are what
    follows the prompt's ids, closed by the template's end marker or by EOS (not doubled when the answer
    already ends with it)."""
    rendered = [answer_text(tokenizer, prompt, answer, end) for prompt, answer in requests]
    joint_texts = [prompt.text + text for (prompt, _), (text, _) in zip(requests, rendered, strict=True)]
    joint = encode_sequences(tokenizer, joint_texts, bos=bos)
    eos = tokenizer.eos_token_id
    out: list[EncodedAnswer] = []
    for (prompt, _), (_, mismatch), ids in zip(requests, rendered, joint, strict=True):
        answer_ids, merged = split_after_prompt(prompt.ids, ids)
        if end.uses_eos and answer_ids[-1:] != [eos]:
            answer_ids = [*answer_ids, eos]
        out.append(EncodedAnswer(answer_ids, merged, mismatch))
    return out
