"""The mallocs a CPU process can run on in place of the C library's: one registry for the two places that need
it, host.py (which one this process runs on, from the libraries mapped into it) and runtime/cpu_allocator.py
(finding one and starting a run on it). Standard library only: both are imported before torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Allocator:
    libraries: tuple[str, ...]  # names for ctypes.util.find_library ("lib" + name + ".so..."), preferred first
    install: str  # how to get it, for the error line
    environ: tuple[tuple[str, str], ...] = ()  # its settings, read from the environment when it starts

    def is_file(self, file_name: str) -> bool:
        """Whether a mapped file's name is one of this allocator's libraries (libtcmalloc_minimal.so.4, ...)."""
        return any(file_name.startswith(f"lib{library}") for library in self.libraries)


ALLOCATORS: dict[str, Allocator] = {
    # The minimal build has no heap profiler, which would only cost time here. tcmalloc prints a line for every
    # allocation over 1 GiB (a 10.7B model's load makes several): the threshold goes out of reach.
    "tcmalloc": Allocator(
        ("tcmalloc_minimal", "tcmalloc"),
        "Debian/Ubuntu: apt install libtcmalloc-minimal4",
        (("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**62)),),
    ),
    "jemalloc": Allocator(("jemalloc",), "Debian/Ubuntu: apt install libjemalloc2"),
}
