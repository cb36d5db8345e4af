"""A deterministic python judge for the self-reward tests, slow enough (a pause per call) that a test can
kill the judging phase half-way. Imported by `--judge python:tests.support.slow_judge:judge` with the repository root on the path."""

from __future__ import annotations

import time

PAUSE_SECONDS = 0.15


def judge(prompt: str, response: str) -> float | None:
    time.sleep(PAUSE_SECONDS)
    if not response.strip():
        return None  # unscored: counted as unparsable, never paired
    return float(sum(map(ord, prompt + response)) % 6)
