"""Test-wide settings.

Triton kernels run under the interpreter on CPU machines. TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports anything.
Set LOWMEM_SDPO_TEST_CUDA=1 on a GPU machine to run the compiled kernels instead.
"""

import os

if os.environ.get("LOWMEM_SDPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
