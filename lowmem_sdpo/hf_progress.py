"""transformers' own progress bars ("Loading weights", "Writing model shards") off while we load or save:
our notes say what is happening, in one line each. Torch-free at import; transformers is imported on use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def hf_bars_off() -> Iterator[None]:
    """transformers' own per-load "Loading weights" bar off while a model loads (our notes say more)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
