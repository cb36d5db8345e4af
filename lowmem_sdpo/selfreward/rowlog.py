"""Append-only JSON Lines that survive a kill: each batch of rows is one write + fsync, and a torn last
line (the process died inside a write) is cut off when the file is opened again.

A phase that writes rows keyed by what they are (prompt index, candidate, judge sample) reads the keys
already present and computes only the missing ones, so a resumed phase never redoes a finished row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


class RowLog:
    def __init__(self, path: Path, key: Callable[[Row], Hashable]) -> None:
        self.path = Path(path)
        self._key = key
        self.rows: dict[Hashable, Row] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        good = 0  # bytes up to the end of the last complete line
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn by a kill: rewritten below
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            self.rows[self._key(row)] = row
            good += len(line)
        if good < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, rows: Iterable[Row]) -> None:
        rows = [r for r in rows if self._key(r) not in self.rows]
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[self._key(r)] = r
