"""Resume: a run stopped at any point and resumed ends with the adapters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.failures import RunInterrupted
from tests.support.engine_fixtures import adapter_tensors, cli_flags, run, small_config

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


def test_sigterm_to_a_real_process_then_cli_resume_matches(tmp_path):
    import subprocess
    import sys
    import time

    reference = small_config(tmp_path, "inprocess", n=48, epochs=2.0, save_every=1000)
    run(reference)
    config = small_config(tmp_path, "killed", n=48, epochs=2.0, save_every=1000)
    command = [sys.executable, "-m", "lowmem_sdpo", "run", *cli_flags(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = Path(config.output_dir) / "step-1" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err  # stopped by the signal, not finished
    assert "SIGTERM" in err and "--resume" in err
    # The signal lands in step 1's loop (or, on a slow machine, at the start of step 2's): a checkpoint
    # of the boundary before it is written either way, and no summary for that step.
    stopped = [p.parent.parent for p in Path(config.output_dir).glob("step-*/checkpoint/state.json")]
    assert len(stopped) == 1 and not (stopped[0] / "summary.json").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    _same_adapters(Path(reference.output_dir), Path(config.output_dir))


def test_options_added_since_a_run_started_compare_as_their_defaults():
    from lowmem_sdpo.engine.config import RunConfig, resume_differences

    now = RunConfig(model="tiny", steps="a.jsonl", output_dir="runs/x")
    older = {k: v for k, v in now.to_dict().items() if k not in ("reference", "reference_batch_size")}
    assert resume_differences(older, now) == []
    assert resume_differences(older, RunConfig(**{**now.to_dict(), "reference": "requantized"})) == ["reference"]


def test_a_run_from_before_lane_dropout_resumes_on_torch_dropout_only():
    """Runs started before --lora-dropout-impl drew peft's nn.Dropout masks; its default now is lanes, which would
    draw other masks mid-run, so such a run resumes only with `--lora-dropout-impl torch`."""
    from lowmem_sdpo.engine.config import RunConfig, resume_differences

    now = RunConfig(model="tiny", steps="a.jsonl", output_dir="runs/x")
    older = {k: v for k, v in now.to_dict().items() if k != "lora_dropout_impl"}
    assert now.lora_dropout_impl == "lanes"
    assert resume_differences(older, now) == ["lora_dropout_impl"]
    assert resume_differences(older, RunConfig(**{**now.to_dict(), "lora_dropout_impl": "torch"})) == []


def test_resume_takes_another_split_of_the_same_effective_batch_only(uninterrupted):
    """batch_size x grad_accum (x ranks) units per optimiser step is what the schedule depends on: another split
    of it resumes (here: the finished run, its steps skipped), another effective batch is refused."""
    tmp, _ = uninterrupted
    with pytest.raises(InputError, match=r"different configuration: batch_size$"):
        run(small_config(tmp, "full", save_every=2, batch_size=2), resume=True)
    assert len(run(small_config(tmp, "full", save_every=2, batch_size=8, grad_accum=1), resume=True)) == 2
