"""bench_e2e.py's result file when several invocations write it (slices of a GPU pass, a system run later): each
row names the invocation that measured it, and each invocation's commit, repeats and host are kept beside it, so
a header written by the last invocation is never read as the particulars of every row."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _report_module():
    sys.path.insert(0, str(BENCHMARKS))  # bench_e2e's package (e2e.*) and its helpers (common) resolve beside it
    from e2e import report

    return report


def _row(system: str, walls: list[float]) -> dict:
    return {"system": system, "shape": "s", "phase": "step", "step": 1, "wall_s": sorted(walls)[len(walls) // 2],
            "wall_s_runs": walls}  # fmt: skip


def _invocation(report, out: Path, system: str, commit: str, repeats: int, walls: list[float]) -> dict:
    args = argparse.Namespace(device="cpu", python="py", systems=[system], repeats=repeats, cpu_allocator="auto")
    rep = report.Report(out, args, commit=commit, changes=[])
    rep.meta["device"] = "cpu (test)"
    rep.by_shape["s"] = [_row(system, walls)]
    rep.write()
    return json.loads(out.read_text())


def test_rows_name_their_invocation_and_a_legacy_header_is_kept_as_such(tmp_path):
    report = _report_module()
    out = tmp_path / "e2e.json"
    # A file from before invocation records: ours and trl at 3 repeats, then ours-b at 1; the header is ours-b's.
    legacy = {"device": "cpu (test)", "commit": "c0ffee0", "repeats": 1, "python": "old",
              "rows": [_row("ours", [3.0, 1.0, 2.0]), _row("trl", [4.0, 5.0, 6.0]), _row("ours-b", [7.0])]}  # fmt: skip
    out.write_text(json.dumps(legacy))

    data = _invocation(report, out, "ours-b", "1234567abc", 2, [8.0, 9.0])
    by_system = {r["system"]: r for r in data["rows"]}
    now = data["latest_invocation"]
    assert now.split("-")[-1] == "1234567" and by_system["ours-b"]["invocation"] == now
    assert by_system["ours-b"]["wall_s_runs"] == [8.0, 9.0]  # the old ours-b row was replaced
    assert by_system["ours"]["invocation"] == by_system["trl"]["invocation"] == report.UNTAGGED
    assert data["invocations"][now]["commit"] == "1234567abc" and data["invocations"][now]["repeats"] == 2
    assert data["invocations"][now]["systems"] == ["ours-b"] and "host" in data["invocations"][now]
    untagged = data["invocations"][report.UNTAGGED]
    assert untagged["commit"] == "c0ffee0" and untagged["repeats"] == 1 and "not necessarily" in untagged["note"]
    assert data["commit"] == "1234567abc" and "repeats" not in data  # the latest's commit; no repeats for every row

    # A later invocation re-runs ours and trl: the legacy record goes with the last row that named it, the first
    # invocation's record stays with its row.
    data = _invocation(report, out, "ours", "89abcde000", 3, [1.5, 1.0, 2.0])
    data = _invocation(report, out, "trl", "89abcde000", 3, [4.5, 4.0, 5.0])
    assert report.UNTAGGED not in data["invocations"] and len(data["invocations"]) == 3  # each its own, in one second
    assert {r["invocation"] for r in data["rows"]} == set(data["invocations"])
    assert data["invocations"][now]["commit"] == "1234567abc"


def test_a_file_of_another_device_is_replaced_not_merged(tmp_path):
    report = _report_module()
    out = tmp_path / "e2e.json"
    out.write_text(json.dumps({"device": "cuda (other)", "rows": [_row("trl", [1.0])]}))
    data = _invocation(report, out, "ours", "1234567abc", 1, [2.0])
    assert [r["system"] for r in data["rows"]] == ["ours"] and list(data["invocations"]) == [data["latest_invocation"]]
