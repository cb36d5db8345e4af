"""Judges: who scores a candidate. `--judge` picks one by name from JUDGE_KINDS:

  self                     M_{t-1} itself, through the rubric (the paper's LLM-as-a-Judge)
  python:module:function   a function (prompt: str, response: str) -> float | None, importable from the
                           working directory or PYTHONPATH (None: no score)
  anything else            another model (hub id, local directory, alias), 4-bit, through the same rubric

A model judge is asked `samples` times per candidate (num_return_sequences of one sampled generation) with
a generous token budget, since the score comes last; each output is parsed by scores.parse_score.
The rubric is a text file with {prompt} and {response} placeholders (`--judge-prompt` replaces it).
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowmem_sdpo.data.types import Message
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.selfreward.generation import SampleSettings, encode_for_generation, generate_batch
from lowmem_sdpo.selfreward.scores import parse_score

DEFAULT_RUBRIC = Path(__file__).resolve().parents[1] / "assets" / "judge_rubric.txt"
PLACEHOLDERS = ("{prompt}", "{response}")


def read_rubric(path: Path | None) -> str:
    path = Path(path) if path else DEFAULT_RUBRIC
    if not path.is_file():
        raise InputError(f"--judge-prompt {path}: no such file")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise InputError(
            f"--judge-prompt {path}: expected the placeholders {' and '.join(PLACEHOLDERS)}; "
            f"missing {', '.join(missing)}"
        )
    return text


def prompt_text(messages: list[Message]) -> str:
    """The request as the judge reads it: a lone user turn as it is, a longer conversation turn by turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def fill_rubric(rubric: str, prompt: str, response: str) -> str:
    # Plain replacement, not str.format: prompts and answers hold braces of their own (code, JSON).
    return rubric.replace("{prompt}", prompt).replace("{response}", response)


@dataclass(frozen=True)
class Verdict:
    outputs: list[str]  # what the judge wrote, one per sample
    scores: list[float | None]  # parse_score of each


class ModelJudge:
    """A causal LM judging through the rubric; `model` may be M_{t-1} itself."""

    def __init__(self, model: nn.Module, tokenizer: Any, rubric: str, settings: SampleSettings) -> None:
        self.model, self.tokenizer, self.rubric, self.settings = model, tokenizer, rubric, settings
        self.label = "model (rubric)"

    def judge_batch(self, items: list[tuple[list[Message], str]], seed: int) -> list[Verdict]:
        conversations = [
            [{"role": "user", "content": fill_rubric(self.rubric, prompt_text(p), r)}] for p, r in items
        ]
        encoded = encode_for_generation(self.tokenizer, conversations)
        outs = generate_batch(self.model, self.tokenizer, encoded, self.settings, seed)
        return [Verdict([c.text for c in row], [parse_score(c.text) for c in row]) for row in outs]


ScoreFn = Callable[[str, str], "float | None"]


class PythonJudge:
    """A user's scoring function; its number is taken as the score (None: unscored)."""

    def __init__(self, spec: str, fn: ScoreFn, samples: int) -> None:
        self.fn, self.samples, self.label = fn, samples, spec

    def judge_batch(self, items: list[tuple[list[Message], str]], seed: int) -> list[Verdict]:
        verdicts = []
        for prompt, response in items:
            scores = [
                _checked(self.label, self.fn(prompt_text(prompt), response)) for _ in range(self.samples)
            ]
            verdicts.append(Verdict([f"{self.label} -> {s}" for s in scores], scores))
        return verdicts


def _checked(label: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"--judge {label}: returned {type(value).__name__}; expected a float or None")
    if not math.isfinite(value):
        # A NaN score would sort anywhere and end as a pair "dropped for identical texts": refuse it by name.
        raise InputError(f"--judge {label}: returned {value}; expected a finite float or None")
    return float(value)


# The pair a python judge is tried on before anything is generated: its signature, its return type and
# whether it raises are then known in a second, not after hours of sampling.
DUMMY_PAIR = ("What is 2 + 2?", "2 + 2 = 4.")


def try_python_judge(spec: str, fn: ScoreFn) -> None:
    """Call `fn` once on DUMMY_PAIR: a function that cannot take (prompt, response), raises, or returns
    something other than a finite float or None is refused now, in one line."""
    try:
        inspect.signature(fn).bind("prompt", "response")
    except TypeError as err:
        raise InputError(f"--judge {spec}: must take (prompt, response): {err}") from err
    except ValueError:
        pass  # a builtin without an introspectable signature: the call below decides
    try:
        value = fn(*DUMMY_PAIR)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise InputError(
            f"--judge {spec}: raised {type(err).__name__} on a test pair ({reason}); expected a float or None"
        ) from err
    _checked(spec, value)


def load_function(spec: str) -> ScoreFn:
    """`python:module:function` -> the function, the working directory importable like `python -m`."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise InputError(f"--judge {spec}: expected python:module:function")
    _, module_name, name = parts
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"--judge {spec}: cannot import module '{module_name}' ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--judge {spec}: module '{module_name}' has no function '{name}'")
    return fn


Judge = ModelJudge | PythonJudge


def judge_kind(spec: str) -> str:
    """The JUDGE_KINDS key of a --judge value."""
    if spec == "self":
        return "self"
    if spec.startswith("python:"):
        return "python"
    return "model"


JUDGE_KINDS: tuple[str, ...] = ("self", "python", "model")
