"""run_sdpo's phase listeners (runtime/peaks.py): on a tiny two-step run they hear each step, its measured
phases and the passes and model loads inside them, in the order the run takes them, every start with its end,
and only names PHASE_EVENTS documents. benchmarks/bench_e2e.py times its phases from these events."""

from __future__ import annotations

import pytest

from lowmem_sdpo.runtime.peaks import PHASE_EVENTS, PhaseEvent, PhaseEvents
from tests.support.engine_fixtures import run, small_config


def _record(config) -> tuple[list[tuple[str, int, str]], list[dict]]:
    heard: list[PhaseEvent] = []
    summaries = run(config, phase_listeners=[heard.append])
    return [(e.name, e.step, e.edge) for e in heard], summaries


def _spans(events: list[tuple[str, int, str]]) -> list[tuple[str, int, tuple[str, ...]]]:
    """(name, step, the names of the spans open around it) per span, in start order; fails unless every end
    closes the span most recently started (spans nest)."""
    open_: list[tuple[str, int]] = []
    spans = []
    for name, step, edge in events:
        if edge == "start":
            spans.append((name, step, tuple(n for n, _ in open_)))
            open_.append((name, step))
        else:
            assert open_ and open_[-1] == (name, step), (name, step, open_)
            open_.pop()
    assert not open_
    return spans


def test_exact_run_hears_each_step_phase_load_and_pass_in_order(tmp_path):
    events, summaries = _record(small_config(tmp_path))
    assert {name for name, _, _ in events} <= set(PHASE_EVENTS)
    spans = _spans(events)
    # S is loaded once, inside step 1's reference phase; step 2 attaches step 1's adapter to it (no load).
    assert spans == [
        ("step", 1, ()),
        ("reference", 1, ("step",)),
        ("load", 1, ("step", "reference")),
        ("reference_pass", 1, ("step", "reference")),
        ("train", 1, ("step",)),
        ("save", 1, ("step",)),
        ("step", 2, ()),
        ("reference", 2, ("step",)),
        ("reference_pass", 2, ("step", "reference")),
        ("train", 2, ("step",)),
        ("save", 2, ("step",)),
    ]
    # The measured phases heard are those summary.json reports peaks for.
    for t, summary in enumerate(summaries, start=1):
        heard = [n for n, step, parents in spans if step == t and parents == ("step",)]
        assert heard == list(summary["peak_memory_bytes_by_phase"])


def test_requantized_run_hears_its_loads_and_drift_passes(tmp_path):
    events, _ = _record(small_config(tmp_path, reference="requantized", diagnostics=True))
    assert {name for name, _, _ in events} <= set(PHASE_EVENTS)
    spans = _spans(events)
    by_step = {t: [(n, p[-1] if p else None) for n, s, p in spans if s == t] for t in (1, 2)}
    # Step 1: S loaded and scored (M_0 is S: no drift model), P_1 on the drift sample in the save phase.
    assert by_step[1] == [("step", None), ("reference", "step"), ("load", "reference"),
                          ("reference_pass", "reference"), ("train", "step"), ("save", "step"),
                          ("drift_pass", "save")]  # fmt: skip
    # Step 2: the holder keeps one model at a time. The trained P_1 for the drift sample is step 1's training
    # base, S, still loaded, plus step 1's adapter as a delta; S's pass (--diagnostics) takes the delta off
    # again; only quantise(S + adapter), the reference M_1, is loaded. P_2 on the drift sample closes the step.
    reference = [n for n, parent in by_step[2] if parent == "reference"]
    assert reference == ["drift_pass", "base_pass", "load", "reference_pass"]
    assert by_step[2][-2:] == [("save", "step"), ("drift_pass", "save")]


def test_a_span_that_raises_still_ends_and_the_error_passes_through():
    heard: list[PhaseEvent] = []
    events = PhaseEvents([heard.append])

    class Boom(Exception):
        pass

    with pytest.raises(Boom), events.in_step(3), events.span("train"):
        raise Boom
    assert [(e.name, e.step, e.edge) for e in heard] == [
        ("step", 3, "start"), ("train", 3, "start"), ("train", 3, "end"), ("step", 3, "end"),
    ]  # fmt: skip
