"""Shared paths and helpers of the plan tests (tests/unit/plan): the shipped config fixtures and the plan's
shapes of a model directory."""

from __future__ import annotations

from pathlib import Path

from lowmem_sdpo.plan import model_shapes
from lowmem_sdpo.plan.source import meta_model, read_source

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
SOLAR = str(FIXTURES / "solar-10.7b")
LLAMA3 = str(FIXTURES / "llama-3-8b")
GIB = 2**30


def shapes_of(model_dir: str | Path, compute_dtype: str):
    return model_shapes(meta_model(read_source(str(model_dir)), compute_dtype))
