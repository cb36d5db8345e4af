"""Batched sampling from the 4-bit model (with a run's adapters as a frozen delta): left-padded prompts,
`num_return_sequences` answers each, stopping at the chat template's end-of-turn token (or EOS where the
template writes none), seeded per batch so a resumed phase regenerates a batch exactly.

The prompt is rendered and tokenised by the data layer (lowmem_sdpo.data.tokenizer), so sampling sees the
very token layout training sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.data.tokenizer import adds_bos, encode_prompts, find_answer_end
from lowmem_sdpo.data.types import Message
from lowmem_sdpo.errors import InputError

# "auto": a static KV cache on CUDA, the dynamic one on CPU, where it saves nothing. The static cache is
# allocated once at its full length, so each token is written in place instead of the cache growing step by
# step; that is all it does here. It brings no torch.compile: transformers compiles generation only for a
# model whose quantizer is compileable, and its bitsandbytes 4-bit quantizer is not (is_compileable False), so
# our NF4 models always decode eagerly. Whether it beats the dynamic cache on a GPU is not measured yet.
CACHE_CHOICES = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class SampleSettings:
    n: int = 4  # answers per prompt (num_return_sequences)
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_size: int = 8  # prompts per generate call
    cache: str = "auto"
    seed: int = 0

    def check(self) -> None:
        if self.n < 1:
            raise InputError(f"-n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise InputError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.cache not in CACHE_CHOICES:
            raise InputError(f"--cache {self.cache!r}: expected one of {', '.join(CACHE_CHOICES)}")


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # generated tokens, the end-of-turn token included when it was reached
    stopped: bool  # reached the end-of-turn token (False: cut by --max-new-tokens)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS, and the template's end-of-turn token when it is one token (`<|im_end|>`, `<end_of_turn>`)."""
    ids = [int(tokenizer.eos_token_id)]
    end = find_answer_end(tokenizer)
    if not end.uses_eos:
        encoded = tokenizer(end.text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def encode_for_generation(tokenizer: Any, conversations: list[list[Message]]) -> list[list[int]]:
    return [p.ids for p in encode_prompts(tokenizer, conversations, bos=adds_bos(tokenizer))]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts aligned at the right, where generation continues them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def cut_at_stop(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The generated ids up to the first stop token (kept), and whether one was reached. What generate
    appends after a sequence stopped (padding, while the rest of the batch goes on) is dropped with it."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1], True
    return ids, False


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: SampleSettings,
    seed: int,
) -> list[list[Completion]]:
    """`settings.n` completions of each prompt; the RNG is seeded with `seed` inside a fork, so the caller's
    streams are untouched and the batch is reproducible on its own."""
    device = _device_of(model)
    pad_id = int(tokenizer.pad_token_id)
    stops = stop_token_ids(tokenizer)
    ids, mask = left_pad(prompts, pad_id)
    sampling = settings.temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "num_return_sequences": settings.n,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
        "do_sample": sampling,
    }
    if sampling:
        # top_k 0: transformers' default top-k of 50 is no part of the paper's nucleus sampling
        kwargs |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    else:  # greedy: no sampling knobs (a model's generation_config may set some), so none is warned about
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    if settings.cache == "static" or (settings.cache == "auto" and device.type == "cuda"):
        kwargs["cache_implementation"] = "static"
    with torch.random.fork_rng(devices=_rng_devices(device)), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, ids.shape[1] :].tolist()
    stop_set = set(stops)
    results: list[list[Completion]] = []
    for p in range(len(prompts)):
        row = []
        for k in range(settings.n):
            kept, stopped = cut_at_stop(new[p * settings.n + k], stop_set)
            body = kept[:-1] if stopped else kept
            row.append(Completion(tokenizer.decode(body, skip_special_tokens=True), len(kept), stopped))
        results.append(row)
    return results


def batches(indices: list[int], size: int) -> Iterator[list[int]]:
    """Fixed batches of row indices: batch k holds rows [k*size, (k+1)*size) of the whole list, whatever
    is already done, so a resumed phase draws each batch with the same seed and the same neighbours."""
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def batch_seed(seed: int, first_index: int) -> int:
    return seed * 1_000_003 + first_index


ProgressFn = Callable[..., None]


def sample_rows(
    model: nn.Module,
    tokenizer: Any,
    conversations: list[list[Message]],
    settings: SampleSettings,
    *,
    done: Callable[[int], bool],
    write: Callable[[list[tuple[int, list[Completion]]]], None],
    advance: ProgressFn,
) -> None:
    """Samples every prompt whose index is not `done`, batch by batch, handing each finished batch to
    `write` (which appends it durably). `advance(n, tok_s=...)` drives a progress bar."""
    settings.check()
    encoded = encode_for_generation(tokenizer, conversations)
    for batch in batches(list(range(len(conversations))), settings.batch_size):
        todo = [i for i in batch if not done(i)]
        if not todo:
            advance(len(batch))
            continue
        started = time.perf_counter()
        # The whole fixed batch is drawn (same seed, same neighbours as an uninterrupted run); only the
        # rows not yet written are kept.
        outs = generate_batch(
            model, tokenizer, [encoded[i] for i in batch], settings, batch_seed(settings.seed, batch[0])
        )
        seconds = time.perf_counter() - started
        tokens = sum(c.tokens for row in outs for c in row)
        write([(i, row) for i, row in zip(batch, outs, strict=True) if i in todo])
        advance(len(batch), tok_s=round(tokens / max(seconds, 1e-9)))
