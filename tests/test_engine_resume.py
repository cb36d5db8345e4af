"""Resume: a run stopped at any point and resumed ends with the adapters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from engine_fixtures import adapter_tensors, run, small_config

from lowmem_sdpo.engine import RunInterrupted
from lowmem_sdpo.errors import InputError

VOLATILE = {"tokens_per_second", "seconds", "memory_bytes", "peak_memory_bytes"}


class Killed(Exception):
    """Stands in for SIGKILL: nothing is saved on the way out."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    config = small_config(tmp, "full", save_every=2)
    run(config)
    return tmp, config


def _same_adapters(a: Path, b: Path) -> None:
    for t in (1, 2):
        x, y = adapter_tensors(a, t), adapter_tensors(b, t)
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (t, key)


def _metrics(run_dir: Path, t: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / f"step-{t}" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_killed_mid_step_then_resumed_matches_uninterrupted(uninterrupted):
    tmp, full = uninterrupted
    config = small_config(tmp, "killed", save_every=2)

    def kill(row):
        if row["step"] == 2 and row["opt_step"] == 3:  # after the checkpoint at 2: optimiser step 3 is lost
            raise Killed

    with pytest.raises(Killed):
        run(config, callbacks=[kill])
    step2 = Path(config.output_dir) / "step-2"
    assert json.loads((step2 / "checkpoint" / "state.json").read_text())["opt_steps_done"] == 2
    assert not (step2 / "summary.json").exists()
    cache = step2 / "reference_logps.safetensors"
    cache_mtime = cache.stat().st_mtime_ns

    run(config, resume=True)
    assert cache.stat().st_mtime_ns == cache_mtime  # the reference pass was not redone
    _same_adapters(Path(full.output_dir), Path(config.output_dir))
    for t in (1, 2):
        assert _metrics(Path(full.output_dir), t) == _metrics(Path(config.output_dir), t)


def test_sigint_checkpoints_then_resume_matches(uninterrupted):
    tmp, full = uninterrupted
    config = small_config(tmp, "sigint", save_every=2)

    def interrupt(row):
        if row["step"] == 1 and row["opt_step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag; the loop saves and stops

    with pytest.raises(RunInterrupted, match="step 1 stopped after optimiser step 1/3"):
        run(config, callbacks=[interrupt])
    state = json.loads((Path(config.output_dir) / "step-1" / "checkpoint" / "state.json").read_text())
    assert state["opt_steps_done"] == 1
    run(config, resume=True)
    _same_adapters(Path(full.output_dir), Path(config.output_dir))


def test_resume_with_another_configuration_names_the_keys(uninterrupted):
    tmp, _ = uninterrupted
    changed = small_config(tmp, "full", save_every=2, beta=0.25, lora_r=4)
    with pytest.raises(InputError, match=r"different configuration: beta, lora_r"):
        run(changed, resume=True)


def test_existing_run_without_resume_is_refused(uninterrupted):
    _, full = uninterrupted
    with pytest.raises(InputError, match="already holds a run"):
        run(full)
