"""The settings of a self-reward run (the paper's defaults) and their checks: torch-free, so the CLI shows
the defaults in --help and refuses bad values before anything heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_sdpo.checks import check_number
from lowmem_sdpo.selfreward.sampling import SampleSettings


@dataclass(frozen=True)
class SelfRewardSettings:
    """The paper's settings are the defaults: 4 candidates at temperature 0.7, top-p 0.9; the model judges
    each 3 times with the additive 5-point rubric."""

    model: str
    prompts: str
    output_dir: str
    iterations: int = 2
    candidates: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    judge: str = "self"
    judge_samples: int = 3
    judge_prompt: str | None = None
    judge_temperature: float = 0.7
    judge_max_new_tokens: int = 1024  # generous: the score comes last, after the justification
    batch_size: int = 8  # prompts (or judged candidates) per generate call
    seed: int = 0
    quiet: bool = False

    def check(self) -> None:
        check_number("--iterations", self.iterations, low=1, integer=True)
        check_number("--candidates", self.candidates, low=2, integer=True, note=" (a pair needs two)")
        check_number("--judge-samples", self.judge_samples, low=1, integer=True)
        self.sampling(1).check({"n": "--candidates", "batch_size": "--gen-batch-size"})
        self.judging(1).check({
            "n": "--judge-samples", "temperature": "--judge-temperature",
            "max_new_tokens": "--judge-max-new-tokens", "batch_size": "--gen-batch-size",
        })  # fmt: skip

    def sampling(self, t: int) -> SampleSettings:
        return SampleSettings(
            n=self.candidates,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed * 1000 + t,
        )

    def judging(self, t: int) -> SampleSettings:
        return SampleSettings(
            n=self.judge_samples,
            temperature=self.judge_temperature,
            top_p=self.top_p,
            max_new_tokens=self.judge_max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed * 1000 + 500 + t,
        )
