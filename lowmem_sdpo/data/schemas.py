"""Recognised dataset layouts: a registry of (name, detector, normaliser).

Detectors look at the column names and the first row; the first schema (in registry order, most specific
first) that fits wins. A normaliser turns one row into a PreferencePair / UnpairedExample, returns a Drop for
a row that is valid but useless (chosen == rejected), or raises RowError naming the column at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lowmem_sdpo.data.messages import ROLES
from lowmem_sdpo.data.types import Message, PreferencePair, UnpairedExample

DROP_IDENTICAL = "identical_answers"
# An empty (or all-whitespace) chosen, rejected or completion: nothing to prefer or learn. Dropped and counted
# under this reason by every loader (preference steps, unpaired rows, sft), never trained on.
DROP_EMPTY = "empty_answer"


class RowError(Exception):
    """A row's value is not what its schema expects; the loader adds the file and row."""

    def __init__(self, column: str, expected: str) -> None:
        super().__init__(f"column '{column}' {expected}")


@dataclass(frozen=True)
class Drop:
    reason: str


@dataclass(frozen=True)
class NormaliseOptions:
    desirable_threshold: float = 3  # HelpSteer: helpfulness >= this = desirable


Example = PreferencePair | UnpairedExample | Drop
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Schema:
    name: str
    kind: str  # "pairs" or "unpaired"
    columns: tuple[str, ...]  # the columns it needs (listed in errors)
    detect: Callable[[set[str], Row], bool]
    normalise: Callable[[Row, NormaliseOptions], Example]


# ---- value checks -----------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _value(row: Row, column: str) -> Any:
    if column not in row:  # JSON Lines rows need not all carry the same keys
        raise RowError(column, "is missing from this row")
    return row[column]


def _string(row: Row, column: str) -> str:
    value = _value(row, column)
    if not isinstance(value, str):
        raise RowError(column, f"must be a string, got {_type_name(value)}")
    return value


def _messages(value: Any, column: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(column, f"must be a list of {{role, content}} messages, got {_type_name(value)}")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise RowError(column, f"message {i} must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(column, f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(column, f"message {i} content must be a string, got {_type_name(content)}")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: Row, column: str = "prompt") -> list[Message]:
    """A prompt column: a plain string (one user turn) or a message list."""
    value = _value(row, column)
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else None
    if messages is None:
        if not isinstance(value, list):
            raise RowError(column, f"must be a string or a list of messages, got {_type_name(value)}")
        messages = _messages(value, column)
    return _non_empty(messages, column)


def _non_empty(messages: list[Message], column: str) -> list[Message]:
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        raise RowError(column, "is empty (expected a non-empty prompt)")
    return messages


def _answer_and_turns(row: Row, column: str) -> tuple[list[Message], str]:
    """A conversation column whose last message is the assistant's answer -> (turns before it, answer)."""
    messages = _messages(_value(row, column), column)
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(column, "must end with an assistant message (the answer)")
    return messages[:-1], messages[-1]["content"]


def _flag(row: Row, column: str) -> bool:
    """A boolean column; CSV's 'true'/'false'/'1'/'0' text and 0/1 integers are accepted too."""
    value = _value(row, column)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(column, f"must be a boolean (true/false), got {value!r}")


def _number(row: Row, column: str) -> float:
    value = _value(row, column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise RowError(column, f"must be a number, got {value!r}")


def _pair(prompt: list[Message], chosen: str, rejected: str) -> Example:
    if not chosen.strip() or not rejected.strip():
        return Drop(DROP_EMPTY)
    return Drop(DROP_IDENTICAL) if chosen == rejected else PreferencePair(prompt, chosen, rejected)


def _single(prompt: list[Message], completion: str, desirable: bool) -> Example:
    return UnpairedExample(prompt, completion, desirable) if completion.strip() else Drop(DROP_EMPTY)


# ---- normalisers ------------------------------------------------------------------------------------


def _standard(row: Row, _: NormaliseOptions) -> Example:
    return _pair(_prompt(row), _string(row, "chosen"), _string(row, "rejected"))


def _shared_turns(row: Row) -> tuple[list[Message], str, str]:
    chosen_turns, chosen = _answer_and_turns(row, "chosen")
    rejected_turns, rejected = _answer_and_turns(row, "rejected")
    if chosen_turns and rejected_turns and chosen_turns != rejected_turns:
        raise RowError("rejected", "must share the turns before the answer with 'chosen'")
    return chosen_turns or rejected_turns, chosen, rejected


def _conversational(row: Row, _: NormaliseOptions) -> Example:
    # UltraFeedback repeats the prompt turn inside chosen/rejected; TRL's layout keeps it only in `prompt`.
    turns, chosen, rejected = _shared_turns(row)
    prompt = _non_empty(turns, "prompt") if turns else _prompt(row)
    return _pair(prompt, chosen, rejected)


def _implicit_prompt(row: Row, _: NormaliseOptions) -> Example:
    turns, chosen, rejected = _shared_turns(row)
    return _pair(_non_empty(turns, "chosen"), chosen, rejected)


def _orca(row: Row, _: NormaliseOptions) -> Example:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("system", f"must be a string, got {_type_name(system)}")
    question = _string(row, "question")
    prompt = [{"role": "system", "content": system}] if system and system.strip() else []
    prompt.append({"role": "user", "content": question})
    return _pair(_non_empty(prompt, "question"), _string(row, "chosen"), _string(row, "rejected"))


def _unpaired(row: Row, _: NormaliseOptions) -> Example:
    return _single(_prompt(row), _string(row, "completion"), _flag(row, "label"))


def _beavertails(row: Row, _: NormaliseOptions) -> Example:
    return _single(_prompt(row), _string(row, "response"), _flag(row, "is_safe"))


def _helpsteer(row: Row, options: NormaliseOptions) -> Example:
    desirable = _number(row, "helpfulness") >= options.desirable_threshold
    return _single(_prompt(row), _string(row, "response"), desirable)


# ---- detectors --------------------------------------------------------------------------------------


def _has(*needed: str) -> Callable[[set[str], Row], bool]:
    return lambda columns, _row: set(needed) <= columns


def _answers_are_lists(with_prompt: bool) -> Callable[[set[str], Row], bool]:
    def detect(columns: set[str], row: Row) -> bool:
        if not {"chosen", "rejected"} <= columns or ("prompt" in columns) != with_prompt:
            return False
        return isinstance(row.get("chosen"), list)

    return detect


def _standard_detect(columns: set[str], row: Row) -> bool:
    return {"prompt", "chosen", "rejected"} <= columns and not isinstance(row.get("chosen"), list)


SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in (
        Schema("orca", "pairs", ("system", "question", "chosen", "rejected"), _has("question", "chosen", "rejected"), _orca),
        Schema("beavertails", "unpaired", ("prompt", "response", "is_safe"), _has("prompt", "response", "is_safe"), _beavertails),
        Schema("helpsteer", "unpaired", ("prompt", "response", "helpfulness"), _has("prompt", "response", "helpfulness"), _helpsteer),
        Schema("unpaired", "unpaired", ("prompt", "completion", "label"), _has("prompt", "completion", "label"), _unpaired),
        Schema("conversational", "pairs", ("prompt", "chosen[msgs]", "rejected[msgs]"), _answers_are_lists(True), _conversational),
        Schema("standard", "pairs", ("prompt", "chosen", "rejected"), _standard_detect, _standard),
        Schema("implicit_prompt", "pairs", ("chosen[msgs]", "rejected[msgs]"), _answers_are_lists(False), _implicit_prompt),
    )
}  # fmt: skip

# Names --columns may map onto: every column some schema reads.
MAPPABLE_COLUMNS: tuple[str, ...] = (
    "prompt", "chosen", "rejected", "system", "question", "completion", "label", "response", "is_safe",
    "helpfulness",
)  # fmt: skip


def detect_schema(columns: set[str], first_row: Row) -> Schema | None:
    return next((s for s in SCHEMAS.values() if s.detect(columns, first_row)), None)


def describe_schemas() -> str:
    return "; ".join(f"{s.name} ({', '.join(s.columns)})" for s in SCHEMAS.values())
