"""The phases' append-only row files: a line torn by a kill is cut off, finished rows are kept and not redone."""

from __future__ import annotations

import json

from lowmem_sdpo.selfreward.rowlog import RowLog


def test_torn_last_line_is_dropped_and_rows_are_not_redone(tmp_path):
    path = tmp_path / "rows.jsonl"
    log = RowLog(path, key=lambda r: r["i"])
    log.append([{"i": 0, "x": "a"}, {"i": 1, "x": "b"}])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"i": 2, "x": "c')  # killed inside the next write
    again = RowLog(path, key=lambda r: r["i"])
    assert sorted(again.rows) == [0, 1] and path.read_bytes() == whole
    again.append([{"i": 1, "x": "changed"}, {"i": 2, "x": "c"}])  # row 1 is done: not written twice
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"i": 0, "x": "a"}, {"i": 1, "x": "b"}, {"i": 2, "x": "c"}]
