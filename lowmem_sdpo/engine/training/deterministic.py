"""--deterministic: bit-identical gradients run to run, for `run` and `sft` alike.

The Triton backward of the fused log-prob op adds its tiles into dH with atomics (their order varies run to
run); the naive and torch implementations run ordered torch ops.
"""

from __future__ import annotations

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.hardware import Hardware, resolve_logprob_impl

ORDERED_IMPLS = frozenset({"torch", "naive"})


def training_impl(hw: Hardware, name: str, *, deterministic: bool = False) -> str:
    """The log-prob implementation training runs for --logprob-impl `name`: with --deterministic, an ordered
    one (auto picks torch; an explicit unordered one is refused in one line)."""
    impl = resolve_logprob_impl(hw, name)
    if not deterministic or impl in ORDERED_IMPLS:
        return impl
    if name != "auto":
        raise InputError(
            f"--deterministic: --logprob-impl {name} sums its gradients with atomics; use torch or auto"
        )
    return "torch"
