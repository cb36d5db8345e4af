"""The sampling settings of `generate` and self-reward's candidate and judge passes, and their checks.

Torch-free, so the CLI builds its parser and refuses bad values before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_sdpo.checks import check_number
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

    def check(self, flags: dict[str, str] | None = None) -> None:
        """One line for the first bad value; `flags` renames fields for the error (self-reward's judge pass
        has --judge-temperature where generate has --temperature). NaN and inf are refused: a NaN
        temperature would otherwise pass `< 0` and silently sample greedily."""
        name = {"n": "-n", "temperature": "--temperature", "top_p": "--top-p",
                "max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size"} | (flags or {})  # fmt: skip
        check_number(name["n"], self.n, low=1, integer=True)
        check_number(name["temperature"], self.temperature, low=0, note=" (0: greedy)")
        check_number(name["top_p"], self.top_p, low=0, high=1, low_open=True)
        check_number(name["max_new_tokens"], self.max_new_tokens, low=1, integer=True)
        check_number(name["batch_size"], self.batch_size, low=1, integer=True)
        check_number("--seed", self.seed, integer=True)
        if self.cache not in CACHE_CHOICES:
            raise InputError(f"--cache {self.cache!r}: expected one of {', '.join(CACHE_CHOICES)}")
