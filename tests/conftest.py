"""Test-wide settings.

Triton kernels run under the interpreter on CPU machines. TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports anything.
The tiny model is cached in a per-session directory (LOWMEM_SDPO_CACHE).
Set LOWMEM_SDPO_TEST_CUDA=1 on a GPU machine to run the compiled kernels instead.
"""

import os
import tempfile

if os.environ.get("LOWMEM_SDPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny demo model is built once per test session into a private cache, never into ~/.cache.
os.environ.setdefault("LOWMEM_SDPO_CACHE", tempfile.mkdtemp(prefix="lowmem-sdpo-test-cache-"))
