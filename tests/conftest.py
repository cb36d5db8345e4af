"""Test-wide settings.

Triton kernels run under the interpreter on CPU machines. TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports anything.
The tiny model is cached in a per-session directory (LOWMEM_SDPO_CACHE).
Set LOWMEM_SDPO_TEST_CUDA=1 on a GPU machine to run the compiled kernels instead.
Tests marked `gpu` (tests/test_gpu.py) are skipped, with the reason, unless CUDA is there and Triton is not
interpreted: the GPU pass is `LOWMEM_SDPO_TEST_CUDA=1 python -m pytest -m gpu`.
"""

import os
import tempfile

import pytest

if os.environ.get("LOWMEM_SDPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny demo model is built once per test session into a private cache, never into ~/.cache.
os.environ.setdefault("LOWMEM_SDPO_CACHE", tempfile.mkdtemp(prefix="lowmem-sdpo-test-cache-"))

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
