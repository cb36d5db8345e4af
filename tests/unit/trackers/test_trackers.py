"""--report-to: a tracker gets metrics.jsonl's rows at run-wide optimiser steps; a missing package is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lowmem_sdpo.cli import main
from tests.support.engine_fixtures import small_config
from tests.support.evaluated_run import evaluated_run


def test_tensorboard_gets_the_rows_of_metrics_jsonl(tmp_path_factory):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, summaries = evaluated_run(tmp_path_factory)
    out = Path(config.output_dir)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    offset = 0
    for t, summary in enumerate(summaries, start=1):
        rows = [json.loads(line) for line in (out / f"step-{t}" / "metrics.jsonl").read_text().splitlines()]
        for key in ("loss", "reward_accuracy", "tokens_per_second", "eval/reward_accuracy", "eval/gamma"):
            logged = {e.step: e.value for e in events.Scalars(key)}
            for row in rows:
                if key in row:
                    assert logged[offset + row["opt_step"]] == pytest.approx(row[key], rel=1e-6)
        offset += summary["optimizer_steps"]
    assert max(e.step for e in events.Scalars("loss")) == offset  # step 2 continues step 1's count


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused_before_anything_runs(tmp_path, capsys):
    config = small_config(tmp_path)
    argv = ["run", "--model", "tiny", "--steps", config.steps, "--output-dir", str(tmp_path / "r"),
            "--report-to", "wandb", "--quiet"]
    assert main(argv) == 2
    assert "wandb package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
