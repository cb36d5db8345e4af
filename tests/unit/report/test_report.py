"""`lowmem-sdpo report`: valid PNGs of a sensible size, and every number of report.md's summary table equal to
summary.json's; the Figure-2 data are the cached reference passes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lowmem_sdpo.cli import main
from lowmem_sdpo.report.plots import reference_drift
from lowmem_sdpo.report.rundata import RunData, StepRecord, read_run
from tests.support.evaluated_run import evaluated_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIB = 2**20
# report.md's row label -> (summary.json key path, unit divisor), written out here rather than read from
# lowmem_sdpo.report.tables, so a wrong mapping there fails this test.
EXPECTED_ROWS = {
    "pairs used": ("pairs_used", 1),
    "optimiser steps": ("optimizer_steps", 1),
    "gamma of the reference M_{t-1} on D_t": ("gamma_ref_mean", 1),
    "gamma of S on D_t": ("gamma_base_mean", 1),
    "first loss": ("first_loss", 1),
    "final loss": ("final_loss", 1),
    "reward accuracy, first 10% of optimiser steps": ("reward_accuracy_first", 1),
    "reward accuracy, last 10%": ("reward_accuracy_final", 1),
    "reward margin, last 10%": ("reward_margin_final", 1),
    "held-out pairs": ("eval.pairs", 1),
    "held-out reward accuracy": ("eval.reward_accuracy", 1),
    "held-out reward margin": ("eval.reward_margin", 1),
    "held-out rewards, chosen": ("eval.rewards_chosen", 1),
    "held-out rewards, rejected": ("eval.rewards_rejected", 1),
    "held-out gamma of the policy": ("eval.gamma", 1),
    "held-out gamma of the reference": ("eval.gamma_ref", 1),
    "reference drift (nats)": ("reference_drift", 1),
    "training shift (nats)": ("training_shift", 1),
    "training tokens / s": ("tokens_per_second", 1),
    "peak memory (MiB)": ("peak_memory_bytes", MIB),
    "wall time (s)": ("wall_seconds", 1),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    config, _ = evaluated_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("report") / "r"
    assert main(["report", config.output_dir, "--out", str(out)]) == 0
    return Path(config.output_dir), out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def test_plots_are_pngs_of_a_sensible_size(report):
    _, out = report
    names = {p.name for p in out.glob("*.png")}
    # an exact-mode run: no reference_drift plot
    assert names == {"gamma_histograms.png", "training_curves.png", "heldout_accuracy.png", "throughput_memory.png"}
    for name in names:
        width, height = _png_size(out / name)
        assert 300 <= width <= 2500 and 200 <= height <= 1500, (name, width, height)
        assert 10_000 < (out / name).stat().st_size < 1_000_000, name
        assert f"]({name})" in (out / "report.md").read_text()


def _summary_rows(markdown: str) -> dict[str, list[str]]:
    lines = markdown.split("## Summary per step", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in rows[2:]}  # after the header and the |---| line


def _lookup(summary: dict, key: str):
    for part in key.split("."):
        summary = summary[part]
    return summary


def test_every_number_of_the_summary_table_is_summary_json(report):
    run_dir, out = report
    summaries = [json.loads((run_dir / f"step-{t}" / "summary.json").read_text()) for t in (1, 2)]
    rows = _summary_rows((out / "report.md").read_text())
    assert set(rows) == set(EXPECTED_ROWS)
    page = (out / "report.html").read_text()
    for label, cells in rows.items():
        key, unit = EXPECTED_ROWS[label]
        assert len(cells) == 2
        for cell, summary in zip(cells, summaries, strict=True):
            expected = _lookup(summary, key) / unit
            assert float(cell) == pytest.approx(expected, rel=1e-5, abs=1e-9), (label, cell, expected)
            assert f"<td>{cell}</td>" in page


def test_figure_2_reads_the_cached_reference_passes(report):
    run_dir, _ = report
    data = read_run(run_dir)
    s1, s2 = data.steps
    assert s1.ratios_ref is None  # step 1's reference is S
    assert float(s1.ratios_s.mean()) == pytest.approx(s1.summary["gamma_ref_mean"], abs=1e-9)
    assert float(s2.ratios_s.mean()) == pytest.approx(s2.summary["gamma_base_mean"], abs=1e-9)
    assert float(s2.ratios_ref.mean()) == pytest.approx(s2.summary["gamma_ref_mean"], abs=1e-9)
    assert len(s2.ratios_ref) == s2.summary["pairs_used"]


def test_drift_plot_only_for_requantized_steps():
    def step(t: int, mode: str) -> StepRecord:
        return StepRecord(t, {"step": t, "reference": mode, "reference_drift": 0.3, "training_shift": 0.1}, [])

    assert reference_drift(RunData(Path("r"), {}, [step(1, "exact"), step(2, "exact")])) is None
    fig = reference_drift(RunData(Path("r"), {}, [step(1, "requantized"), step(2, "requantized")]))
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == [0.3, 0.1]  # step 2's drift and training shift (step 1 has no drift to show)


def test_refuses_to_replace_a_directory_that_is_not_a_report(report, tmp_path, capsys):
    run_dir, _ = report
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "is not an earlier report output" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert main(["report", str(tmp_path / "nothing")]) == 2
