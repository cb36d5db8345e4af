"""Progress: bars with an ETA on a terminal (a phase inside another joins its display), one line per phase
elsewhere and under --quiet."""

from __future__ import annotations

import io

from rich.console import Console

from lowmem_sdpo.runtime.reporting import Reporter


def test_not_a_terminal_gives_one_line_per_phase(capsys):
    reporter = Reporter()
    with reporter.task("step 1: reference log-probs", total=5) as advance:
        for _ in range(5):
            advance(1, loss=0.5)
    with reporter.phase("loading S"):
        pass
    merge = reporter.merge_progress()
    for done in range(1, 4):
        merge("merging adapters (exact)", done, 3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" done in ")[0] for line in lines] == [
        "step 1: reference log-probs: 5/5",
        "loading S:",
        "merging adapters (exact): 3/3",
    ]
    assert all(line.endswith(" s") for line in lines)


def test_quiet_keeps_the_phase_lines_and_drops_notes_and_tables(capsys):
    reporter = Reporter(quiet=True)
    reporter.note("a note")
    reporter.table("a table", [("k", "v")])
    with reporter.task("step 1: training", total=2) as advance:
        advance(2)
    assert capsys.readouterr().out.splitlines()[0].startswith("step 1: training: 2/2 done in ")


def test_a_terminal_gets_bars_with_eta_and_nested_phases_share_the_display():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    reporter = Reporter(console=console)
    assert reporter.live
    with reporter.task("step 1: training", total=2) as advance:
        with reporter.task("step 1: held-out evaluation", total=3) as inner:
            inner(3)
        advance(2, loss=0.25)
    text = out.getvalue()
    assert "step 1: training" in text and "step 1: held-out evaluation" in text
    assert "eta" in text and "loss 0.25" in text
    assert reporter._progress is None  # the display closed with the outer phase
