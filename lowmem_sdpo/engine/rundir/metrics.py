"""metrics.jsonl (one line per optimiser step) and the step's summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import write_text

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TAIL_FRACTION = 0.1  # "final" reward accuracy / margin: the mean over the last 10% of optimiser steps


class MetricsLog:
    """Appends one JSON line per optimiser step (flushed, so a crash loses at most the line being written).

    On resume the file is cut back (atomically) to the lines of the checkpoint's optimiser steps, so the
    log matches the state training continues from. With `write` False (ranks other than 0 of a data-parallel
    run) it only reads the file and keeps the rows in memory.
    """

    def __init__(self, path: Path, keep_lines: int, write: bool = True) -> None:
        self.path = path
        self.write = write
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text().splitlines()[:keep_lines]:
                self.rows.append(json.loads(line))
        if write:
            write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows) if rows else float("nan")


def _share(rows: list[dict[str, Any]], fraction: float) -> int:
    return max(1, math.ceil(fraction * len(rows)))


def tail_mean(rows: list[dict[str, Any]], key: str, fraction: float = TAIL_FRACTION) -> float:
    return _mean(rows[-_share(rows, fraction) :], key)


def head_mean(rows: list[dict[str, Any]], key: str, fraction: float = TAIL_FRACTION) -> float:
    """Mean over the first 10% of optimiser steps after the first one: at the first, policy == reference,
    every reward is exactly 0 and the accuracy is 0 by definition, which would flatter any later value."""
    rows = rows[1:] if len(rows) > 1 else rows
    return _mean(rows[: _share(rows, fraction)], key)


def read_summary(step_dir: Path) -> dict[str, Any] | None:
    path = step_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
