"""runtime/cpu_heap.py: after bound_cpu_heap, glibc serves a large tensor from a fresh mapping even after a larger
block was freed (which, left alone, raises malloc's mmap threshold so that later tensors come from the heap
and stay in it when freed). Each case runs in its own process: the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowmem_sdpo.runtime.cpu_heap import heap_bytes

SCRIPT = """
import json, sys
import torch
from lowmem_sdpo.runtime.cpu_heap import bound_cpu_heap, heap_bytes
bounded = bound_cpu_heap() if sys.argv[1] == "bounded" else False
big = torch.empty(8 * 2**20, dtype=torch.uint8)
del big  # freed: unless the threshold is fixed, glibc raises it to this block's size (or it was higher already)
before = heap_bytes()["mmapped"]
t = torch.ones(2 * 2**20, dtype=torch.uint8)
print(json.dumps({"bounded": bounded, "mmapped": heap_bytes()["mmapped"] - before}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap_bytes() is None, reason="needs glibc (mallinfo2 and mallopt)")
def test_a_freed_large_block_no_longer_sends_later_tensors_to_the_heap():
    default, bounded = _run("glibc"), _run("bounded")
    assert default == {"bounded": False, "mmapped": 0}  # the 2 MiB tensor came from the heap
    assert bounded["bounded"] is True
    assert bounded["mmapped"] >= 2 * 2**20  # its own mapping, returned to the system when freed
