"""Test-wide settings.

Triton kernels run under the interpreter on CPU machines. TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports anything.
The tiny model is cached in a per-session directory (LOWMEM_SDPO_CACHE).
Set LOWMEM_SDPO_TEST_CUDA=1 on a GPU machine to run the compiled kernels instead.
bitsandbytes' CPU inference repacking depends on the host's AVX512-BF16 (lowmem_sdpo/models/quant.py). So that
every host runs the same suite, bitsandbytes is made to believe the feature is there, in this process and in every
process a test spawns (tests/bnb_host/sitecustomize.py); LOWMEM_SDPO_TEST_BNB_AVX512BF16=0 runs the suite as on a
host without it. The `bnb_cpu_kind` fixture runs a test both ways.
Tests marked `gpu` (tests/gpu/test_gpu.py) are skipped, with the reason, unless CUDA is there and Triton is not
interpreted: the GPU pass is `LOWMEM_SDPO_TEST_CUDA=1 python -m pytest -m gpu`.
"""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

if os.environ.get("LOWMEM_SDPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny demo model is built once per test session into a private cache, never into ~/.cache.
os.environ.setdefault("LOWMEM_SDPO_CACHE", tempfile.mkdtemp(prefix="lowmem-sdpo-test-cache-"))

BNB_HOST_DIR = Path(__file__).resolve().parent / "bnb_host"
BNB_AVX512BF16_ENV = "LOWMEM_SDPO_TEST_BNB_AVX512BF16"
os.environ.setdefault(BNB_AVX512BF16_ENV, "1")
# Spawned processes import tests/bnb_host/sitecustomize.py at start-up; this one loads it here, before any test
# imports bitsandbytes.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BNB_HOST_DIR), os.environ.get("PYTHONPATH")) if p)
_spec = importlib.util.spec_from_file_location("bnb_host_simulation", BNB_HOST_DIR / "sitecustomize.py")
assert _spec is not None and _spec.loader is not None
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))

GPU_RUN = "LOWMEM_SDPO_TEST_CUDA=1 python -m pytest -m gpu"


def gpu_skip_reason() -> str | None:
    """Why the gpu-marked tests cannot run here, or None when they can."""
    import torch  # here, not at the top: TRITON_INTERPRET above must be set before anything imports triton

    if not torch.cuda.is_available():
        return f"needs a CUDA device (none here); on a GPU machine run {GPU_RUN}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Interpreted Triton on a GPU machine would test the interpreter, not the compiled kernels.
        return f"TRITON_INTERPRET=1 is set, so Triton would be interpreted, not compiled: run {GPU_RUN}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = gpu_skip_reason() if gpu_items else None
    if reason is None:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["absent", "present"], ids=["no-avx512bf16", "avx512bf16"])
def bnb_cpu_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test as on a host without AVX512-BF16 and as on one with it (bitsandbytes' CPU repacking)."""
    monkeypatch.setenv(BNB_AVX512BF16_ENV, "1" if request.param == "present" else "0")
    return request.param
