"""`plan`'s training-phase activations on the real SmolLM2-135M-Instruct (30 layers, vocabulary 49,152, tied
head), against the live tensors of a real CPU optimiser step (issue 28's check, at a shorter length than its
512 tokens: the figures scale with tokens, benchmarks/results/profile_train_memory_smollm2.json has 512 and 1024)."""

from __future__ import annotations

import pytest

from lowmem_sdpo.models import resolve_model
from tests.support.plan_cases import cpu_training_activations
from tests.support.real_smollm2 import ALIAS, skip_without_package

pytestmark = pytest.mark.real


def test_plan_training_activations_match_smollm2s_live_tensors():
    skip_without_package()
    measured, planned, top = cpu_training_activations(resolve_model(ALIAS), pairs=2, length=160, prompt=32)
    assert measured == pytest.approx(planned, rel=0.15), (measured, planned, top)
