"""What a run does when it cannot go on: one line, an exit code, the checkpoints kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.cli import main
from lowmem_sdpo.runtime.failures import NonFiniteLoss, OutOfMemory
from tests.support.engine_fixtures import run, small_config, unpaired_toy


def test_nan_loss_stops_and_names_step_and_batch(tmp_path):
    # A learning rate of 1e30 makes the first Adam update put ~1e30 into every LoRA factor; B @ A then
    # overflows fp32 and the next loss is NaN: a diverged run, as users meet it.
    config = small_config(tmp_path, learning_rate=1e30, warmup_ratio=0.0, save_every=1)
    with pytest.raises(NonFiniteLoss, match=r"NaN loss at step 1, optimiser step 2, micro-batch 1"):
        run(config)
    step1 = Path(config.output_dir) / "step-1"
    assert not (step1 / "summary.json").exists()
    # The last good state (after optimiser step 1) is kept for --resume.
    assert json.loads((step1 / "checkpoint" / "state.json").read_text())["opt_steps_done"] == 1


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        # cuBLAS failing to allocate its workspace: a plain RuntimeError, not the allocator's error
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
    ids=["allocator", "cublas"],
)
def test_out_of_memory_is_reported_with_advice_and_checkpoint_kept(tmp_path, error):
    config = small_config(tmp_path, save_every=1)

    def oom(row):
        if row["opt_step"] == 2:
            raise error

    with pytest.raises(OutOfMemory, match=r"out of memory during step 1 \(train\).*peak in reference.*--resume"):
        run(config, callbacks=[oom])
    state = json.loads((Path(config.output_dir) / "step-1" / "checkpoint" / "state.json").read_text())
    assert state["opt_steps_done"] == 2


def test_other_runtime_errors_are_not_out_of_memory(tmp_path):
    config = small_config(tmp_path, save_every=1)

    def broken(row):
        raise RuntimeError("shape mismatch in something else")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(config, callbacks=[broken])


def test_summary_holds_each_phase_peak(tmp_path):
    config = small_config(tmp_path)
    config.steps = config.steps.split(",")[0]
    summary = run(config)[0]
    phases = summary["peak_memory_bytes_by_phase"]
    assert list(phases) == ["reference", "train", "save"]
    assert all(v > 0 for v in phases.values())
    assert summary["peak_memory_bytes"] == max(phases.values())


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_model_alias_is_one_line_exit_2(tmp_path, capsys):
    data = tmp_path / "x.jsonl"  # the data item exists, so the model is what is refused
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    code, err = _cli(
        ["run", "--model", "./no/such/model", "--steps", str(data), "--output-dir", str(tmp_path / "r")],
        capsys,
    )
    assert code == 2
    assert err.startswith("error: model './no/such/model'") and "\n" not in err


def test_paired_only_loss_on_unpaired_data_is_one_line(tmp_path, capsys):
    data = unpaired_toy(tmp_path / "u.jsonl", 12)
    code, err = _cli(
        [
            "run",
            "--model",
            "tiny",
            "--steps",
            str(data),
            "--output-dir",
            str(tmp_path / "r"),
            "--loss",
            "ipo",
            "--quiet",
        ],
        capsys,
    )
    assert code == 2
    assert "holds unpaired data" in err and "loss 'ipo' needs preference pairs" in err and "\n" not in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_loss_flag_for_another_loss_is_refused(tmp_path, capsys):
    code, err = _cli(
        [
            "run",
            "--model",
            "tiny",
            "--steps",
            "x.jsonl",
            "--output-dir",
            str(tmp_path / "r"),
            "--loss",
            "sigmoid",
            "--dpop-lambda",
            "5",
        ],
        capsys,
    )
    assert code == 2 and "--dpop-lambda" in err


def test_bad_config_file_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\nlearning_rat: 0.1\n")
    code, err = _cli(
        ["run", "--config", str(cfg), "--steps", "x.jsonl", "--output-dir", str(tmp_path / "r")], capsys
    )
    assert code == 2 and "unknown option 'learning_rat'" in err


def test_config_file_values_and_flag_precedence(tmp_path):
    import argparse

    from lowmem_sdpo.cli.run_cmd import add_run_arguments, config_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\nsteps: a.jsonl\noutput-dir: runs/x\nbeta: 0.3\nloss: dpop\ndpop_lambda: 7\n")
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(cfg), "--beta", "0.2"]))
    assert config.beta == 0.2  # the flag wins over the file
    assert config.loss == "dpop" and config.loss_options == {"dpop_lambda": 7.0}
    assert config.output_dir == "runs/x" and config.learning_rate == 5e-6  # default kept


def test_bundled_paper_config_parses(tmp_path):
    import argparse

    from lowmem_sdpo.cli.run_cmd import add_run_arguments, config_from_args

    repo = Path(__file__).resolve().parents[3]
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(repo / "examples" / "solar_sdpo.yaml")]))
    assert (config.model, config.steps, config.loss) == (
        "solar-10.7b-sft",
        "openorca,ultrafeedback",
        "sigmoid",
    )
    assert config.batch_size * config.grad_accum == 16 and config.diagnostics
