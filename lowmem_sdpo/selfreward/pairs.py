"""D_t from judged candidates: per prompt, the highest-scored candidate against the lowest.

A candidate's score is the mean of its parsable judgements (unparsable ones are left out of the mean; a
candidate with none is unscored and takes no part). A prompt gives no pair when fewer than two candidates
are scored, when the highest and lowest scores tie (all equal: no preference to learn), or when the two
texts are identical. Among equal highest (or lowest) scores the first candidate wins, so D_t is a
function of the judged rows alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

DROP_TIE = "tie"
DROP_TOO_FEW_SCORED = "fewer_than_two_scored"
DROP_IDENTICAL = "identical_texts"


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "pairs": self.pairs, "drops": dict(sorted(self.drops.items()))}


def pick_pair(candidates: list[str], scores: list[float | None]) -> tuple[int, int] | str:
    """(chosen index, rejected index), or the reason no pair is made."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return DROP_TOO_FEW_SCORED
    best = max(scored, key=lambda si: (si[0], -si[1]))[1]  # highest score, first index among equals
    worst = min(scored, key=lambda si: (si[0], si[1]))[1]  # lowest score, first index among equals
    if scores[best] == scores[worst]:
        return DROP_TIE
    if candidates[best] == candidates[worst]:
        return DROP_IDENTICAL
    return best, worst


def build_pairs(prompts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], PairStats]:
    """`prompts`: one dict per prompt with `prompt`, `candidates` [str], `scores` [mean or None] and
    `judgements` [[{output, score}]]; returns D_t's rows (a standard preference row plus the evidence)."""
    stats = PairStats(prompts=len(prompts))
    rows = []
    for item in prompts:
        picked = pick_pair(item["candidates"], item["scores"])
        if isinstance(picked, str):
            stats.drops[picked] += 1
            continue
        best, worst = picked
        rows.append(
            {
                "prompt": item["prompt"],
                "chosen": item["candidates"][best],
                "rejected": item["candidates"][worst],
                "score_chosen": item["scores"][best],
                "score_rejected": item["scores"][worst],
                "prompt_index": item["prompt_index"],
                "chosen_index": best,
                "rejected_index": worst,
                "candidates": item["candidates"],
                "scores": item["scores"],
                "judgements": item["judgements"],
            }
        )
    stats.pairs = len(rows)
    return rows, stats
