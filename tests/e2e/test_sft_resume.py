"""`sft` on the shared training loop: a run killed mid-way and resumed ends as the uninterrupted run (adapter
bit for bit, the same metrics rows), SIGTERM checkpoints and exits 130, a NaN loss exits 3 with the last good
checkpoint kept, a checkpoint of another optimiser class is refused, and options sft does not use are refused.

The bundled tiny model on 40 toy rows: batch 2 x 2 micro-batches, 2 epochs -> 20 optimiser steps, LoRA
dropout on (so a resume must restore the RNG stream as well as the weights, optimiser and schedule).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.cli import build_parser, main
from lowmem_sdpo.cli.sft_cmd import sft_config
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.failures import NonFiniteLoss
from lowmem_sdpo.sft.train import run_sft
from tests.support.engine_fixtures import toy_slice

VOLATILE = {"tokens_per_second", "seconds"}


class Killed(Exception):
    """Stands in for SIGKILL: nothing is saved on the way out."""


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", "tiny", "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "2", "--epochs", "2", "--lora-dropout", "0.1", "--device", "cpu",
            "--no-gradient-checkpointing", "--max-length", "32", "--max-prompt-length", "24",
            "--logprob-impl", "torch", "--learning-rate", "1e-3", "--save-every", "2", "--quiet",
            *extra]  # fmt: skip


def _config(argv: list[str]):
    config, _ = sft_config(build_parser().parse_args(argv))
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = toy_slice(tmp / "rows.jsonl", 1, 40)
    assert main(_argv(data, tmp / "full")) == 0
    return tmp, data, tmp / "full"


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _rows(out: Path) -> list[dict]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def _same_run(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rows = _rows(a)
    assert len(rows) == 20 and rows == _rows(b)
    assert json.loads((a / "summary.json").read_text())["final_loss"] == json.loads(
        (b / "summary.json").read_text()
    )["final_loss"]


def _opt_steps_saved(out: Path) -> int:
    return json.loads((out / "train" / "checkpoint" / "state.json").read_text())["opt_steps_done"]


def test_killed_mid_run_then_resumed_equals_the_uninterrupted_run(uninterrupted):
    tmp, data, full = uninterrupted
    out = tmp / "killed"

    def kill(row):
        if row["opt_step"] == 5:  # after the checkpoint at 4: optimiser step 5 is lost
            raise Killed

    with pytest.raises(Killed):
        run_sft(_config(_argv(data, out)), callbacks=[kill])
    assert _opt_steps_saved(out) == 4 and not (out / "summary.json").exists()
    assert len(_rows(out)) == 5  # the lost step's line is cut back on resume

    # A checkpoint holding another optimiser class's state is refused in one line (the settings record
    # cannot catch it: --optim auto resolves by device).
    other = tmp / "other-optimiser"
    shutil.copytree(out, other)
    state = other / "train" / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "optimizer": "AdamW8bit"}))
    with pytest.raises(InputError, match=r"^--resume: SFT's checkpoint holds AdamW8bit state, this run would use AdamW"):
        run_sft(_config(_argv(data, other)), resume=True)

    assert main([*_argv(data, out), "--resume"]) == 0
    _same_run(full, out)


def test_sigterm_to_the_cli_checkpoints_exits_130_and_resume_equals(uninterrupted):
    tmp, data, full = uninterrupted
    out = tmp / "sigterm"
    command = [sys.executable, "-m", "lowmem_sdpo", *_argv(data, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err  # stopped by the signal, not finished
    # one process stops mid-window (the partial accumulation discarded) or, between windows, after a step
    assert re.search(r"SIGTERM: SFT stopped (before|after) optimiser step \d+/20; checkpoint saved", err), err
    assert "--resume" in err
    done = _opt_steps_saved(out)
    assert 3 <= done < 20 and len(_rows(out)) == done and not (out / "summary.json").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(full, out)


def test_nan_loss_exits_3_and_keeps_the_last_good_checkpoint(uninterrupted, capsys):
    tmp, data, _ = uninterrupted
    out = tmp / "nan"
    # lr 1e30: the first Adam update puts ~1e30 into every LoRA factor; B @ A overflows and the next loss is NaN
    argv = [*_argv(data, out), "--learning-rate", "1e30", "--warmup-ratio", "0", "--save-every", "1"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NaN loss in SFT at optimiser step 2, micro-batch 1") and "\n" not in err
    assert _opt_steps_saved(out) == 1 and not (out / "summary.json").exists()
    with pytest.raises(NonFiniteLoss):  # the API raises the exception the CLI turns into exit 3
        run_sft(_config(argv), resume=True)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--eval-split", "0.1"], "unrecognized arguments: --eval-split"),
        (["--eval-every", "2"], "unrecognized arguments: --eval-every"),
        (["--beta", "0.5"], "unrecognized arguments: --beta"),
        (["--deterministic", "--logprob-impl", "triton"], "--deterministic: --logprob-impl triton sums its gradients"),
    ],
)
def test_options_sft_does_not_use_are_refused_in_one_line(tmp_path, capsys, extra, expected):
    data = toy_slice(tmp_path / "rows.jsonl", 1, 4)
    try:  # argparse refuses a flag it does not know by SystemExit(2); the engine's InputError returns 2
        code = main(_argv(data, tmp_path / "out", *extra))  # the last --logprob-impl given wins
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    assert not (tmp_path / "out" / "sft.json").exists()  # refused before the run directory is written


def test_run_sft_refuses_a_config_that_sets_an_option_it_does_not_use(tmp_path):
    from dataclasses import replace

    config = _config(_argv(toy_slice(tmp_path / "rows.jsonl", 1, 4), tmp_path / "out"))
    for name, value in (("eval_split", 0.1), ("beta", 0.5), ("diagnostics", True)):
        with pytest.raises(InputError, match=rf"^sft does not use --{name.replace('_', '-')} "):
            run_sft(replace(config, **{name: value}))
    assert not (tmp_path / "out").exists()


def test_report_to_tensorboard_gets_the_rows_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = toy_slice(tmp_path / "rows.jsonl", 1, 8)
    out = tmp_path / "out"
    argv = [*_argv(data, out), "--epochs", "1", "--report-to", "tensorboard"]
    assert main(argv) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert len(rows) == 2 and logged == {r["opt_step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
