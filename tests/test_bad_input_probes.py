"""Bad input never costs data (issue 23): every probe a user could type is refused with its exit code, one
line on stderr, and nothing written, changed or deleted -- the target's bytes are hashed before and after.

The probes run in-process (`main(argv)`), in a fresh working directory each, against a finished one-step
run made from a small saved Llama and adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_fixtures import write_adapter, write_llama
from probe_fixtures import Probe, run_probe, tree_digest, write_fake_run

from lowmem_sdpo.checks import OUTPUT_MARKER
from lowmem_sdpo.cli import main


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe-run")
    model = write_llama(root / "model", dtype=torch.float32, with_tokenizer=True)
    adapter = write_adapter(model, root / "adapter", seed=1)
    return write_fake_run(root, model, adapter), model


def _keep_dir(tmp: Path) -> None:
    (tmp / "keep").mkdir()
    (tmp / "keep" / "notes.txt").write_text("keep\n")


def _data_file(tmp: Path) -> None:
    (tmp / "data.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')


def _foreign_report(tmp: Path) -> None:
    # A directory that happens to hold a report.md, made by the user: not ours, so not replaced.
    (tmp / "docs").mkdir()
    (tmp / "docs" / "report.md").write_text("# my notes\n")


EXPORT_PROBES = [
    Probe(["export", "--run", "{run}", "--out", "keep"], says="--out keep", setup=_keep_dir, id="user-dir"),
    Probe(["export", "--run", "{run}", "--out", "{run}"], says="--out", id="the-run-itself"),
    Probe(["export", "--run", "{run}", "--out", "{run}/step-1"], says="--out", id="inside-the-run"),
    Probe(["export", "--run", "{run}", "--out", "data.jsonl"], says="not a directory", setup=_data_file, id="data-file"),
    Probe(["export", "--run", "{run}", "--out", "."], says="current directory", setup=_keep_dir, id="dot"),
    Probe(["export", "--run", "{run}", "--out", "data.jsonl/sub"], says="is a file", setup=_data_file, id="under-a-file"),
    Probe(["export", "--run", "{run}", "--out", "{model}"], says="--out", id="the-model"),
    Probe(["export", "--run", "{run}", "--out", "{model}/.."], says="--out", id="above-the-model"),
    Probe(["report", "{run}", "--out", "docs"], says="--out docs", setup=_foreign_report, id="report-user-dir"),
    Probe(["report", "{run}", "--out", "data.jsonl/r"], says="is a file", setup=_data_file, id="report-under-a-file"),
    Probe(["report", "{run}", "--out", "{run}"], says="--out", id="report-the-run"),
]


@pytest.mark.parametrize("probe", EXPORT_PROBES, ids=[p.id for p in EXPORT_PROBES])
def test_output_probes_leave_everything_as_it_was(probe, finished_run, tmp_path, monkeypatch, capsys):
    run, model = finished_run
    monkeypatch.chdir(tmp_path)
    run_probe(probe, tmp_path, capsys, run=run, model=model)


def test_export_replaces_only_its_own_earlier_output(finished_run, tmp_path, monkeypatch, capsys):
    run, _ = finished_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(run), "--out", "empty", "--quiet"]) == 0  # an empty directory is free
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()
    first = tree_digest(tmp_path / "empty")
    # Exporting again over its own output is allowed, and the same inputs give the same bytes.
    assert main(["export", "--run", str(run), "--out", "empty", "--quiet"]) == 0
    assert tree_digest(tmp_path / "empty") == first
    # Without its marker the same directory is no longer recognised as an export, so it is left alone.
    (tmp_path / "empty" / OUTPUT_MARKER).unlink()
    before = tree_digest(tmp_path / "empty")
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", "empty", "--quiet"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert tree_digest(tmp_path / "empty") == before
