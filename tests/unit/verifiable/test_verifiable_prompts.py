"""The verifiable-instruction prompt pools: seeded, disjoint, the held-out topics unused in training, and each
prompt's constraints recoverable from its text alone (issue 27)."""

from __future__ import annotations

from lowmem_sdpo.verifiable.constraints import CONSTRAINTS, compatible
from lowmem_sdpo.verifiable.judge import parse_constraints
from lowmem_sdpo.verifiable.prompts import build_pools, split_topics

SIZES = {"step1": 20, "step2": 20, "validation": 20, "heldout": 40}


def test_pools_are_seeded_sized_and_disjoint() -> None:
    pools = build_pools(SIZES)
    assert {k: len(v) for k, v in pools.items()} == SIZES
    assert [it.prompt for it in build_pools(SIZES)["heldout"]] == [it.prompt for it in pools["heldout"]]
    assert [it.prompt for it in build_pools(SIZES, seed=1)["heldout"]] != [it.prompt for it in pools["heldout"]]
    texts = [it.prompt for items in pools.values() for it in items]
    assert len(texts) == len(set(texts))


def test_heldout_and_validation_topics_are_not_training_topics() -> None:
    pools = build_pools(SIZES)
    train = {it.topic for s in ("step1", "step2") for it in pools[s]}
    for split in ("validation", "heldout"):
        assert not train & {it.topic for it in pools[split]}
    assert not {it.topic for it in pools["validation"]} & {it.topic for it in pools["heldout"]}
    shares = split_topics()
    assert sum(map(len, shares.values())) == len({t for ts in shares.values() for t in ts})


def test_step_difficulty_and_constraints_read_back() -> None:
    pools = build_pools(SIZES)
    order = list(CONSTRAINTS)
    assert all(len(it.constraints) == 1 for it in pools["step1"])
    assert all(len(it.constraints) == 2 for it in pools["step2"])
    for split in ("validation", "heldout"):
        assert {len(it.constraints) for it in pools[split]} == {1, 2}
    for items in pools.values():
        for it in items:
            assert compatible([name for name, _ in it.constraints])
            assert parse_constraints(it.prompt) == sorted(it.constraints, key=lambda c: order.index(c[0]))
