"""SFT rows -> (prompt, answer) examples. A registry of row layouts, detected from the columns:

  prompt_completion   prompt (string or messages), completion (string)
  messages            messages: a conversation ending with the assistant's answer
  alpaca              instruction, input, output (c-s-ale/alpaca-gpt4-data)
  openorca            system_prompt, question, response (Open-Orca/OpenOrca)
  preference          any preference layout `lowmem-sdpo run` reads: the chosen side is trained on

Tokenisation is the data layer's (prompt rendered by the chat template, answer closed by its end marker).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowmem_sdpo.data import StepData, UnpairedExample, load_steps
from lowmem_sdpo.data.messages import MessageError, message_list
from lowmem_sdpo.data.schemas import DROP_EMPTY
from lowmem_sdpo.data.sources import RawSource, read_source
from lowmem_sdpo.data.spec import parse_steps
from lowmem_sdpo.data.types import Message
from lowmem_sdpo.errors import InputError

Row = dict[str, Any]


class _RowError(Exception):
    pass


def _text(row: Row, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise _RowError(f"field '{column}' must be a string, got {type(value).__name__}")
    return value


def _prompt_completion(row: Row) -> tuple[list[Message], str]:
    prompt = row.get("prompt")
    messages = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else message_list(prompt, "prompt")
    )
    return messages, _text(row, "completion")


def _messages(row: Row) -> tuple[list[Message], str]:
    messages = message_list(row.get("messages"), "messages")
    if messages[-1]["role"] != "assistant":
        raise _RowError("field 'messages' must end with an assistant message (the answer)")
    return messages[:-1], messages[-1]["content"]


def _alpaca(row: Row) -> tuple[list[Message], str]:
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise _RowError("field 'input' must be a string")
    request = _text(row, "instruction") + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": request}], _text(row, "output")


def _openorca(row: Row) -> tuple[list[Message], str]:
    system = row.get("system_prompt") or ""
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    return [*messages, {"role": "user", "content": _text(row, "question")}], _text(row, "response")


@dataclass(frozen=True)
class SftLayout:
    name: str
    columns: tuple[str, ...]
    read: Callable[[Row], tuple[list[Message], str]]


SFT_LAYOUTS: dict[str, SftLayout] = {
    layout.name: layout
    for layout in (
        SftLayout("prompt_completion", ("prompt", "completion"), _prompt_completion),
        SftLayout("messages", ("messages",), _messages),
        SftLayout("alpaca", ("instruction", "output"), _alpaca),
        SftLayout("openorca", ("question", "response"), _openorca),
    )
}


def _layout(source: RawSource) -> SftLayout | None:
    columns = set(source.columns)
    # "label" marks unpaired preference data (prompt, completion, label): not SFT rows.
    if "label" in columns:
        return None
    return next((lay for lay in SFT_LAYOUTS.values() if set(lay.columns) <= columns), None)


def _examples_from(
    source: RawSource, layout: SftLayout, limit: int | None, seed: int, drops: Counter[str]
) -> list[UnpairedExample]:
    indices = list(range(len(source.rows)))
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(f"sft-sample-{seed}").sample(indices, limit))
    out = []
    for i in indices:
        try:
            prompt, answer = layout.read(source.rows[i])
        except (_RowError, MessageError) as err:
            raise InputError(f"{source.name}: {source.where(i)}: {err} ({layout.name} rows)") from err
        if not answer.strip():
            drops[DROP_EMPTY] += 1  # nothing to learn from an empty answer: counted, as run counts its own
            continue
        out.append(UnpairedExample(prompt=prompt, completion=answer, label=True))
    return out


def load_sft_examples(spec: str, *, seed: int = 0, limits: dict[str, int] | None = None) -> StepData:
    """Every item of the comma-separated `spec` (files, local dataset directories, hub ids[:split]) as one
    SFT set; `limits` caps an item's rows with a seeded sample (the recipe's documented sizes)."""
    examples: list[UnpairedExample] = []
    drops: Counter[str] = Counter()
    rows = 0
    sources = []
    for item in parse_steps(spec, "--data"):
        source = read_source(item)
        sources.append(source.name)
        layout = _layout(source)
        if layout is not None:
            before = len(examples) + sum(drops.values())
            examples += _examples_from(source, layout, (limits or {}).get(item.text), seed, drops)
            rows += len(examples) + sum(drops.values()) - before
            continue
        try:
            steps = load_steps(item.text, seed=seed, flag="--data")
        except InputError as err:
            known = "; ".join(f"{lay.name} ({', '.join(lay.columns)})" for lay in SFT_LAYOUTS.values())
            raise InputError(f"{source.name}: not SFT rows ({known}) nor preference rows: {err}") from err
        for step in steps:
            if not step.pairs:
                raise InputError(
                    f"{source.name}: unpaired rows carry no answer to imitate; expected SFT or pair rows"
                )
            examples += [UnpairedExample(p.prompt, p.chosen, True) for p in step.pairs]
            drops.update(step.drops)
            rows += step.n_source_rows
    if not examples:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(drops.items()))
        raise InputError(f"--data {spec}: no SFT examples{f' (dropped: {dropped})' if dropped else ''}")
    return StepData(
        label=spec, source=", ".join(sources), schema="sft", unpaired=examples, n_source_rows=rows,
        drops=dict(sorted(drops.items())),
    )  # fmt: skip
