"""Imports every system makes, done before any clock starts, so that no phase is charged for them."""

from __future__ import annotations


def preimport() -> None:
    """What every system imports at some point, imported before any clock starts (TRL's own imports happen at
    `from trl import ...`, before its clock; ours imports some of them lazily inside run_sdpo)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401
