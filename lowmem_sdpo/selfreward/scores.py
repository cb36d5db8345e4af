"""Reading the judge's score: the LAST `Score: x` of its output, x in [0, 5].

The rubric asks for the score on the last line, after the justification, so only the last `Score:` counts:
a judge that quotes the rubric ("... Score: 5 means ...") or revises itself ("Score: 3 ... on reflection,
Score: 4") is read by its final word. Accepted forms: `Score: 4`, `score: 3.5`, `Score: **4**`,
`Score: 4/5`, `Score = 4 points`. The last `Score:` outside [0, 5] (`Score: 7`, `Score: 8/10`) or without a
number makes the output unparsable (None): an earlier in-range score is not silently taken instead, since
the judge's final answer was invalid. Unparsable outputs are counted, never scored as 0.
"""

from __future__ import annotations

import math
import re

MAX_SCORE = 5.0
# `Score` then `:` or `=`, markdown emphasis allowed around the number, an optional `/ denominator`.
_SCORE = re.compile(
    r"score\s*[:=]\s*[*_`\s]*(?P<value>[-+]?\d+(?:\.\d+)?)?(?:[*_`\s]*/\s*(?P<den>\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)


def parse_score(output: str) -> float | None:
    """The score of one judge output, or None when its last `Score:` holds no number in [0, 5]."""
    matches = list(_SCORE.finditer(output))
    if not matches:
        return None
    last = matches[-1]
    if last.group("value") is None:
        return None
    value = float(last.group("value"))
    den = last.group("den")
    if den is not None and float(den) != MAX_SCORE:
        return None  # "8/10" is another scale: not the rubric's, so not guessed at
    if not math.isfinite(value) or not 0.0 <= value <= MAX_SCORE:
        return None
    return value


def mean_score(scores: list[float | None]) -> float | None:
    """The mean of a candidate's parsable judgements (the paper averages 3); None when none parsed."""
    valid = [s for s in scores if s is not None]
    return sum(valid) / len(valid) if valid else None
