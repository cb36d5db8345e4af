"""Tokenizing one step: each prompt once, each answer jointly with its prompt, truncation and drops counted.

Chosen and rejected share the very same prompt ids (the prompt is encoded once), which DPO's log-ratio
needs. An answer's ids are what follows those prompt ids when the whole conversation is rendered by the chat
template and tokenised in one piece, closed by the template's end-of-turn marker or EOS (see tokenizer.py;
examples whose tokens merge across the prompt/answer boundary are counted in stats["boundary_merges"]).
The prompt is cut from the left (its end, next to the answer, matters most; BOS is kept), the answer from
the right. A truncated answer loses its end marker: it did not end there, and the model should not learn
that it does.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from lowmem_sdpo.data.tokenizer import (
    EncodedAnswer,
    adds_bos,
    encode_answers,
    encode_prompts,
    find_answer_end,
    has_chat_template,
)
from lowmem_sdpo.data.types import (
    PreferencePair,
    StepData,
    TokenizedExample,
    TokenizedPair,
    TokenizedStep,
    UnpairedExample,
)
from lowmem_sdpo.errors import InputError

DROP_NO_ROOM = "no_room_for_answer"  # the (cut) prompt leaves no token of max_length for the answer
DROP_IDENTICAL_AFTER_CUT = "identical_after_truncation"
BOUNDARY_MERGES = "boundary_merges"  # the tokenizer merged prompt and answer tokens across the boundary
TEMPLATE_MISMATCHES = "template_mismatches"  # the template's full rendering did not extend the prompt's


def length_summary(lengths: list[int]) -> dict[str, int]:
    """p50 / p95 / max by the nearest-rank rule (an actual length, never an interpolated one)."""
    if not lengths:
        return {"p50": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)

    def rank(q: float) -> int:  # the ceil(q * n)-th smallest; the epsilon absorbs float error in q * n
        return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]

    return {"p50": rank(0.50), "p95": rank(0.95), "max": ordered[-1]}


def _irregular_joins(*answers: EncodedAnswer) -> list[str]:
    """The stats an example counts under (once, however many of its answers are affected)."""
    hits = {
        BOUNDARY_MERGES: any(a.boundary_merge for a in answers),
        TEMPLATE_MISMATCHES: any(a.template_mismatch for a in answers),
    }
    return [name for name, hit in hits.items() if hit]


def cut_prompt(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """Keep the end of the prompt (next to the answer), and BOS in front when the tokenizer uses one."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids[0] == bos_id and limit >= 2:
        return [ids[0], *ids[len(ids) - (limit - 1) :]]
    return ids[len(ids) - limit :]


def _validate(max_length: int, max_prompt_length: int) -> None:
    if max_length < 2:
        raise InputError(f"--max-length must be at least 2 (prompt token + answer token), got {max_length}")
    if max_prompt_length < 1:
        raise InputError(f"--max-prompt-length must be at least 1, got {max_prompt_length}")


def tokenize_step(
    step: StepData, tokenizer: Any, *, max_length: int = 1024, max_prompt_length: int = 512
) -> TokenizedStep:
    """Token ids for every example of `step` that fits; see the module docstring for the rules.

    stats: rows, examples, kept, dropped {reason: n} (normalising drops included), truncated
    {prompt|chosen|rejected|completion: n}, prompt_tokens / answer_tokens (p50, p95, max before
    truncation), longest_sequence (after truncation), boundary_merges and template_mismatches (kept
    examples with at least one answer joined that way, see tokenizer.split_after_prompt / answer_text).
    settings include answer_end: the end-of-turn marker's text, or "eos".
    """
    _validate(max_length, max_prompt_length)
    bos = adds_bos(tokenizer)
    end = find_answer_end(tokenizer)
    examples: list[PreferencePair | UnpairedExample] = [*step.pairs, *step.unpaired]

    # Each distinct prompt is rendered and encoded once; chosen and rejected then share its ids.
    keys = [json.dumps(e.prompt, sort_keys=True) for e in examples]
    pair_keys, unpaired_keys = keys[: len(step.pairs)], keys[len(step.pairs) :]
    distinct = list(dict.fromkeys(keys))
    conversations = {k: e.prompt for k, e in zip(keys, examples, strict=True)}
    prompts = dict(
        zip(distinct, encode_prompts(tokenizer, [conversations[k] for k in distinct], bos=bos), strict=True)
    )
    full_prompts = {k: p.ids for k, p in prompts.items()}
    cut_prompts = {
        k: cut_prompt(ids, max_prompt_length, tokenizer.bos_token_id) for k, ids in full_prompts.items()
    }
    requests = [
        (prompts[k], t) for k, p in zip(pair_keys, step.pairs, strict=True) for t in (p.chosen, p.rejected)
    ]
    requests += [(prompts[k], u.completion) for k, u in zip(unpaired_keys, step.unpaired, strict=True)]
    encoded = encode_answers(tokenizer, requests, end=end, bos=bos)
    answers = [a.ids for a in encoded]

    dropped: Counter[str] = Counter(step.drops)
    truncated: Counter[str] = Counter()  # kept examples only: a dropped one is counted under its drop reason
    joins: Counter[str] = Counter()  # kept examples only, as for truncated
    longest = 0
    pairs: list[TokenizedPair] = []
    for i, key in enumerate(pair_keys):
        prompt = cut_prompts[key]
        chosen, rejected = answers[2 * i], answers[2 * i + 1]
        room = max_length - len(prompt)
        if room < 1:
            dropped[DROP_NO_ROOM] += 1
            continue
        cuts = {
            "prompt": len(prompt) < len(full_prompts[key]),
            "chosen": len(chosen) > room,
            "rejected": len(rejected) > room,
        }
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            dropped[DROP_IDENTICAL_AFTER_CUT] += 1
            continue
        truncated.update(name for name, was_cut in cuts.items() if was_cut)
        joins.update(_irregular_joins(encoded[2 * i], encoded[2 * i + 1]))
        longest = max(longest, len(prompt) + max(len(chosen), len(rejected)))
        pairs.append(TokenizedPair(prompt, chosen, rejected))

    unpaired: list[TokenizedExample] = []
    completions = encoded[2 * len(step.pairs) :]
    for key, example, encoded_completion in zip(unpaired_keys, step.unpaired, completions, strict=True):
        completion = encoded_completion.ids
        prompt = cut_prompts[key]
        room = max_length - len(prompt)
        if room < 1:
            dropped[DROP_NO_ROOM] += 1
            continue
        cuts = {"prompt": len(prompt) < len(full_prompts[key]), "completion": len(completion) > room}
        truncated.update(name for name, was_cut in cuts.items() if was_cut)
        joins.update(_irregular_joins(encoded_completion))
        longest = max(longest, len(prompt) + min(len(completion), room))
        unpaired.append(TokenizedExample(prompt, completion[:room], example.label))

    stats = {
        "rows": step.n_source_rows,
        "examples": len(step.pairs) + len(step.unpaired),
        "kept": len(pairs) + len(unpaired),
        "dropped": dict(sorted(dropped.items())),
        "truncated": dict(sorted(truncated.items())),
        "prompt_tokens": length_summary([len(full_prompts[k]) for k in keys]),
        "answer_tokens": length_summary([len(a) for a in answers]),
        "longest_sequence": longest,
        "boundary_merges": joins[BOUNDARY_MERGES],
        "template_mismatches": joins[TEMPLATE_MISMATCHES],
    }
    settings = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "chat_template": "tokenizer" if has_chat_template(tokenizer) else "fallback",
        "answer_end": end.label,
        "bos_id": tokenizer.bos_token_id if bos else None,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
    }
    return TokenizedStep(pairs=pairs, unpaired=unpaired, stats=stats, settings=settings)
