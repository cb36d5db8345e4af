"""The C heap of a CPU run: why the process can hold ten times the tensors it has alive, and the one setting
that stops it.

torch's CPU allocator is malloc. glibc's malloc serves a request at or above its mmap threshold with a fresh
mmap, returned to the system on free, and smaller ones from its heap, which keeps freed memory for reuse. The
threshold starts at 128 KiB, but every free of an mmap'd block raises it to that block's size (up to 32 MiB on
64-bit). After the first few frees every activation of a small model's step (SmolLM2-135M at 4 x 512 tokens:
hidden 4.5 MiB, MLP 12 MiB, the log-prob op's 30 MiB chunks) comes from the heap. Most likely (the free heap
is measured, this reason inferred) a checkpointed forward keeps one small tensor per layer (its input, for the
recompute) between large temporaries that are freed; the kept ones split the freed space, the next layer's
large temporaries no longer fit the holes, and the heap grows by about a layer's temporaries per layer.
Measured (benchmarks/profile_train_memory.py, SmolLM2 at 4 x 512 tokens): 297 MiB of live tensors at the
training peak, 4.8 GiB RSS in the first step, 3.8 GiB of the heap free; bounded, 1.5 GiB RSS.

`bound_cpu_heap` fixes the threshold (glibc's `mallopt(M_MMAP_THRESHOLD, ...)`; setting it switches the
adjustment off), so large tensors go back to the system when freed and RSS follows the live tensors. The cost
is a fresh, zeroed mapping per large allocation (page faults): about 8 million minor faults and 38% more CPU
seconds per training step there, 19% over a whole 4-pair run (benchmarks/ab_cpu_heap.py). CUDA runs keep
activations in the CUDA caching allocator and do not need it; other C libraries (musl, macOS) are left alone.

Cheaper bounds were measured there and are not used: transparent huge pages for glibc's mappings
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1) or for torch's large tensors (THP_MEM_ALLOC_ENABLE=1) fault less but cost
as much CPU or more; a higher fixed threshold (5 MiB) lets the hidden-size activations fragment the heap again;
128 KiB in the forward with the heap's 32 MiB in the backward lets it grow step after step. 128 KiB stays.

tcmalloc has neither cost (runtime/cpu_allocator.py): a run the CLI started on it is not bounded, since mallopt
is glibc's and the preloaded allocator serves every request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from lowmem_sdpo.host import cpu_allocator

# glibc <malloc.h>: M_MMAP_THRESHOLD is -3. 128 KiB is glibc's own starting value; fixing it is what counts.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # gnu_get_libc_version exists in glibc only: musl's mallopt is a no-op stub and is not worth calling.
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


# Said once by a run whose heap was bounded (it runs on glibc: tcmalloc is not installed, or --cpu-allocator glibc).
# The figure: SmolLM2-135M, 24 pairs, 2 threads, training loop 198 s bounded on glibc against 109 s on tcmalloc
# (benchmarks/results/e2e_cpu_smollm2_24.json and e2e_cpu_smollm2_tcmalloc_24.json).
BOUNDED_HEAP_NOTE = (
    "CPU run on glibc's malloc: its heap is bounded (a third of the memory, about 1.8x the training time of "
    "tcmalloc, measured on SmolLM2-135M); install tcmalloc (Debian/Ubuntu: apt install libtcmalloc-minimal4) "
    "and --cpu-allocator auto runs on it, or pass --no-bound-cpu-heap (faster, about 4x the memory)"
)


def bound_cpu_heap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc malloc's mmap threshold for this process (see the module docstring). True if set; False where
    the C library is not glibc or another allocator (tcmalloc, jemalloc) was preloaded in its place.
    Process-wide and permanent, so the engine calls it once, for CPU runs only."""
    libc = _glibc()
    if libc is None or cpu_allocator() != "glibc":
        return False
    return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))


def heap_bytes() -> dict[str, int] | None:
    """glibc's main-arena figures (mallinfo2): heap size, in use, free; None where unavailable."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {"heap": info.arena, "in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}
