"""D_t: per prompt the highest-scored candidate against the lowest; ties, all-equal and unscored dropped."""

from __future__ import annotations

from lowmem_sdpo.selfreward.pairs import DROP_IDENTICAL, DROP_TIE, DROP_TOO_FEW_SCORED, build_pairs, pick_pair


def test_max_against_min():
    assert pick_pair(["a", "b", "c", "d"], [2.0, 4.5, 1.0, 3.0]) == (1, 2)


def test_equal_best_or_worst_scores_take_the_first_candidate():
    assert pick_pair(["a", "b", "c", "d"], [4.0, 1.0, 4.0, 1.0]) == (0, 1)


def test_all_equal_is_a_tie():
    assert pick_pair(["a", "b", "c"], [3.0, 3.0, 3.0]) == DROP_TIE


def test_unscored_candidates_take_no_part():
    # The unparsable one is neither the lowest (it is not a 0) nor the highest.
    assert pick_pair(["a", "b", "c"], [None, 2.0, 5.0]) == (2, 1)
    # Only one scored candidate left: no pair.
    assert pick_pair(["a", "b", "c"], [None, 2.0, None]) == DROP_TOO_FEW_SCORED
    assert pick_pair(["a", "b"], [None, None]) == DROP_TOO_FEW_SCORED
    # The scored ones tie: dropped though an unscored one exists.
    assert pick_pair(["a", "b", "c"], [1.0, None, 1.0]) == DROP_TIE


def test_identical_texts_make_no_pair():
    assert pick_pair(["same", "same"], [5.0, 1.0]) == DROP_IDENTICAL


def test_build_pairs_rows_and_counts():
    judged = [
        {
            "prompt_index": 0,
            "prompt": "p0",
            "candidates": ["x", "y"],
            "scores": [1.0, 4.0],
            "judgements": [[], []],
        },
        {
            "prompt_index": 1,
            "prompt": "p1",
            "candidates": ["x", "y"],
            "scores": [2.0, 2.0],
            "judgements": [[], []],
        },
        {
            "prompt_index": 2,
            "prompt": "p2",
            "candidates": ["x", "y"],
            "scores": [None, 2.0],
            "judgements": [[], []],
        },
        {
            "prompt_index": 3,
            "prompt": "p3",
            "candidates": ["u", "v", "w"],
            "scores": [3.0, None, 0.0],
            "judgements": [[], [], []],
        },
    ]
    rows, stats = build_pairs(judged)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p0", "y", "x"), ("p3", "u", "w")]
    assert [(r["score_chosen"], r["score_rejected"]) for r in rows] == [(4.0, 1.0), (3.0, 0.0)]
    assert rows[1]["candidates"] == ["u", "v", "w"] and rows[1]["scores"] == [3.0, None, 0.0]
    assert stats.to_dict() == {"prompts": 4, "pairs": 2, "drops": {DROP_TIE: 1, DROP_TOO_FEW_SCORED: 1}}
