"""Judge outputs read by their last `Score:`, in [0, 5]; adversarial outputs included."""

from __future__ import annotations

import pytest

from lowmem_sdpo.selfreward.scores import mean_score, parse_score


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("The answer is relevant and useful.\nScore: 3", 3.0),
        ("Score: 4", 4.0),
        ("score: 2.5", 2.5),
        ("Justification...\nScore: **4**", 4.0),
        ("Score = 1 point", 1.0),
        ("Score: 0", 0.0),
        ("Score: 5/5", 5.0),
        ("Score: 4/5", 4.0),
        ("Score: 4 / 5", 4.0),
        # several scores: the rubric puts the final one last, so the last one counts
        ("Score: 5 would need expertise. It lacks it.\nScore: 3", 3.0),
        ("Score: 2 ... on reflection the answer is complete.\nScore: 4", 4.0),
        ("The rubric says 'Score: <points>'. I give it\nScore: 1", 1.0),
    ],
)
def test_parsable_outputs(output, expected):
    assert parse_score(output) == expected


@pytest.mark.parametrize(
    "output",
    [
        "",  # nothing
        "The answer is excellent, five points.",  # no Score: at all
        "Score: 6",  # above 5
        "Score: 5\nScore: 7",  # the last one is out of range: not rescued by the earlier one
        "Score: -1",
        "Score: 8/10",  # another scale
        "Score: high",  # no number
        "Score: 4\nFinal Score:",  # the last Score: holds no number
        "Score: 50",
    ],
)
def test_unparsable_outputs(output):
    assert parse_score(output) is None


def test_mean_leaves_unparsable_out():
    assert mean_score([4.0, None, 2.0]) == 3.0
    assert mean_score([None, None]) is None
    assert mean_score([5.0]) == 5.0
