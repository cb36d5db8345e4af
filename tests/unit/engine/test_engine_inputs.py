"""`lowmem-sdpo run` inputs through the CLI: the default run directory, and each bad input is exit 2 with one
line on stderr naming the option, found before any model is loaded, with nothing written.

Every test runs in an empty working directory, so "nothing written" is "the directory is as it was"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowmem_sdpo.cli import main
from lowmem_sdpo.engine.config import default_output_dir


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty cwd with two small step files under data/ (never read: every test here stops before)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("toy_step1.jsonl", "toy_step2.jsonl"):
        (tmp_path / "data" / name).write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    return tmp_path


STEPS = "data/toy_step1.jsonl,data/toy_step2.jsonl"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails(argv: list[str], capsys, root: Path, option: str) -> str:
    """Runs the CLI; asserts exit 2, one stderr line naming `option`, and no file or directory created."""
    before = _tree(root)
    code = main(["run", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"error: {option}"), err
    assert _tree(root) == before
    return err.strip()


@pytest.mark.parametrize(
    ("model", "steps", "expected"),
    [
        ("tiny", "examples/data/toy_step1.jsonl,/abs/dir/toy_step2.jsonl", "runs/tiny-toy_step1-toy_step2"),
        (
            "solar-10.7b-instruct",
            "openorca,ultrafeedback",
            "runs/solar-10.7b-instruct-openorca-ultrafeedback",
        ),
        ("upstage/SOLAR-10.7B-v1.0", "ultrafeedback@2", "runs/SOLAR-10.7B-v1.0-ultrafeedback_2"),
        ("./models/my llama/", "Org/ds:test@3:by=source", "runs/my_llama-ds_test_3_by_source"),
        ("m", "v1.5.parquet,x.csv:train,y.json@2", "runs/m-v1.5-x_train-y_2"),
    ],
)
def test_default_output_dir_slug(model, steps, expected):
    assert default_output_dir(model, steps) == expected


def test_default_output_dir_is_short_and_keeps_long_inputs_apart():
    steps_a = ",".join(f"/data/part_number_{i:03d}_of_the_corpus.jsonl" for i in range(12))
    steps_b = steps_a.replace("part_number_011", "part_number_999")
    a, b = default_output_dir("tiny", steps_a), default_output_dir("tiny", steps_b)
    assert a.startswith("runs/tiny-part_number_000_of_the_corpus-")
    assert len(a) == len("runs/") + 80 and len(b) == len(a) and a != b
    assert default_output_dir("tiny", steps_a) == a  # deterministic


def test_resume_finds_the_default_directory_and_refuses_when_no_run_is_there(workdir, capsys):
    err = _fails(["--model", "tiny", "--steps", STEPS, "--resume"], capsys, workdir, "--resume")
    assert err == (
        "error: --resume runs/tiny-toy_step1-toy_step2: no run there (no run.json); drop --resume to start one"
    )


def test_resume_of_an_existing_directory_without_run_json(workdir, capsys):
    (workdir / "runs" / "x").mkdir(parents=True)
    err = _fails(
        ["--model", "tiny", "--steps", STEPS, "--output-dir", "runs/x", "--resume"],
        capsys,
        workdir,
        "--resume",
    )
    assert "no run there (no run.json)" in err


def test_a_new_run_over_the_default_directory_of_an_earlier_run_is_refused(workdir, capsys):
    run_dir = workdir / "runs" / "tiny-toy_step1-toy_step2"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    err = _fails(["--model", "tiny", "--steps", STEPS], capsys, workdir, "--output-dir")
    assert "runs/tiny-toy_step1-toy_step2: already holds a run" in err and "--resume" in err


def test_the_run_directory_is_printed_first_and_nothing_is_written_when_the_model_is_bad(workdir, capsys):
    code = main(["run", "--model", "./no/such/model", "--steps", STEPS])
    out, err = capsys.readouterr()
    assert code == 2 and "./no/such/model" in err and err.count("\n") == 1
    assert out.splitlines()[0] == "run directory: runs/model-toy_step1-toy_step2"
    assert _tree(workdir) == ["data", "data/toy_step1.jsonl", "data/toy_step2.jsonl"]


def test_quiet_does_not_print_the_run_directory(workdir, capsys):
    assert main(["run", "--model", "./no/such/model", "--steps", STEPS, "--quiet"]) == 2
    assert "run directory" not in capsys.readouterr().out


@pytest.mark.parametrize(("prompt", "total"), [("512", "512"), ("600", "512"), ("24", "8")])
def test_max_prompt_length_must_leave_room_for_the_answer(workdir, capsys, prompt, total):
    argv = ["--model", "tiny", "--steps", STEPS, "--max-prompt-length", prompt, "--max-length", total]
    err = _fails(argv, capsys, workdir, "--max-prompt-length")
    assert f"--max-prompt-length {prompt} must be less than --max-length {total}" in err


def test_max_prompt_length_from_a_config_file_too(workdir, capsys):
    (workdir / "c.yaml").write_text("max-length: 256\nmax-prompt-length: 256\n")
    _fails(
        ["--config", "c.yaml", "--model", "tiny", "--steps", STEPS], capsys, workdir, "--max-prompt-length"
    )


def test_output_dir_that_is_a_file(workdir, capsys):
    (workdir / "taken").write_text("x")
    err = _fails(
        ["--model", "tiny", "--steps", STEPS, "--output-dir", "taken"], capsys, workdir, "--output-dir"
    )
    assert "taken: exists and is a file" in err


def test_output_dir_under_a_file(workdir, capsys):
    (workdir / "taken").write_text("x")
    argv = ["--model", "tiny", "--steps", STEPS, "--output-dir", "taken/run"]
    err = _fails(argv, capsys, workdir, "--output-dir")
    assert "taken/run: cannot write there" in err and "not a writable directory" in err


def test_output_dir_whose_nearest_existing_ancestor_is_not_writable(workdir, capsys, monkeypatch):
    # Permission bits do not bind root (the CI user here), so the denial is os.access's answer for one path.
    locked = (workdir / "locked").resolve()
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path).resolve() != locked and real_access(path, mode)
    )
    argv = ["--model", "tiny", "--steps", STEPS, "--output-dir", "locked/a/b"]
    err = _fails(argv, capsys, workdir, "--output-dir")
    assert f"locked/a/b: cannot write there ({locked} is not a writable directory)" in err


def test_non_empty_output_dir_without_a_run_is_refused_before_loading(workdir, capsys):
    (workdir / "out").mkdir()
    (workdir / "out" / "notes.txt").write_text("mine")
    err = _fails(
        ["--model", "tiny", "--steps", STEPS, "--output-dir", "out"], capsys, workdir, "--output-dir"
    )
    assert "exists and is not empty" in err
