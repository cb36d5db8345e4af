"""What a resumed run must share with the run it continues (tokenizer, chat template, hub commit, device,
optimiser), the cache key over every token id, and fp16 training with a GradScaler."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.engine.rundir.keys import hub_commit, units_digest
from lowmem_sdpo.engine.units import Unit
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import resolve_model
from tests.support.engine_fixtures import run, small_config


class _Stop(Exception):
    pass


def _stop_after_first_optimiser_step(row: dict) -> None:
    if row["step"] == 1 and row["opt_step"] == 1:
        raise _Stop


def _interrupted(tmp: Path, name: str, **overrides):
    """A run stopped after its first optimiser step, with a checkpoint (save_every=1) to resume from."""
    config = small_config(tmp, name, n=16, **overrides)
    with pytest.raises(_Stop):
        run(config, callbacks=[_stop_after_first_optimiser_step])
    return config


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """The tiny model in a directory of this test's own, so its tokenizer files can be edited."""
    dst = tmp_path / "tiny-copy"
    shutil.copytree(resolve_model("tiny"), dst)
    return dst


def test_units_digest_sees_every_id_and_where_it_sits():
    a = Unit([1, 2], [3], [1, 2], [4])
    assert units_digest([a]) == units_digest([Unit([1, 2], [3], [1, 2], [4])])
    assert units_digest([a]) != units_digest([Unit([1, 2], [3], [1, 2], [5])])
    assert units_digest([a]) != units_digest([Unit([1], [2, 3], [1, 2], [4])])  # same ids, other boundary


def test_editing_the_chat_template_and_resuming_is_refused(tmp_path, tiny_copy):
    config = _interrupted(tmp_path, "template", model=str(tiny_copy))
    path = tiny_copy / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["chat_template"] = settings["chat_template"].replace("### User:", "### Human:")
    path.write_text(json.dumps(settings))
    with pytest.raises(InputError, match="chat template") as err:
        run(config, resume=True)
    assert "tokenizer files" in str(err.value)  # the file holding the template changed too
    assert not (Path(config.output_dir) / "step-1" / "summary.json").exists()


def test_editing_the_tokenizer_and_resuming_is_refused(tmp_path, tiny_copy):
    config = _interrupted(tmp_path, "tokenizer", model=str(tiny_copy))
    path = tiny_copy / "special_tokens_map.json"
    path.write_text(path.read_text() + "\n")
    with pytest.raises(InputError, match=r"tokenizer files") as err:
        run(config, resume=True)
    assert "chat template" not in str(err.value)


def test_resume_on_another_device_type_is_refused(tmp_path):
    config = _interrupted(tmp_path, "device")
    run_file = Path(config.output_dir) / "run.json"
    saved = json.loads(run_file.read_text())
    saved["device_type"] = "cuda"  # as if started on a GPU
    run_file.write_text(json.dumps(saved))
    with pytest.raises(InputError, match=r"device type: cuda -> cpu"):
        run(config, resume=True)


def test_resume_into_another_optimiser_class_is_refused(tmp_path):
    config = _interrupted(tmp_path, "optim")
    state_file = Path(config.output_dir) / "step-1" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["optimizer"] == "AdamW"
    state["optimizer"] = "PagedAdamW8bit"  # what --optim auto wrote on CUDA before it became non-paged
    state_file.write_text(json.dumps(state))
    with pytest.raises(InputError, match=r"holds PagedAdamW8bit state, this run would use AdamW"):
        run(config, resume=True)


def _hub_cache(root: Path, repo: str, commits: dict[str, Path], main: str) -> Path:
    """The hub cache layout: models--org--name/refs/main names a commit, snapshots/<commit>/ holds files."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(main)
    for commit, files in commits.items():
        if not (repo_dir / "snapshots" / commit).exists():
            shutil.copytree(files, repo_dir / "snapshots" / commit)
    return repo_dir


def test_hub_model_is_pinned_to_its_commit_and_resumed_from_it(tmp_path, monkeypatch, tiny_copy):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    first, second = "1" * 40, "2" * 40
    _hub_cache(cache, "org/tiny", {first: tiny_copy}, main=first)

    config = _interrupted(tmp_path, "hub", model="org/tiny")
    saved = json.loads((Path(config.output_dir) / "run.json").read_text())
    assert saved["model_revision"] == first
    assert hub_commit(Path(saved["model_dir"])) == first

    # The branch moves on to a different model; the resumed run still loads the commit it started from.
    other = tmp_path / "other"
    shutil.copytree(tiny_copy, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("128", "129", 1))
    _hub_cache(cache, "org/tiny", {second: other}, main=second)
    assert hub_commit(resolve_model("org/tiny")) == second
    summaries = run(config, resume=True)
    assert len(summaries) == 2


def test_fp16_trains_with_a_grad_scaler_and_checkpoints_it(tmp_path):
    config = small_config(tmp_path, "fp16", n=16, compute_dtype="float16")
    config.steps = config.steps.split(",")[0]
    seen: list[bool] = []

    def scaler_saved(row: dict) -> None:
        if row["opt_step"] == 1:  # the checkpoint of optimiser step 1 is written before the callbacks run
            seen.append((Path(config.output_dir) / "step-1" / "checkpoint" / "scaler.pt").is_file())

    summary = run(config, callbacks=[scaler_saved])[0]
    assert seen == [True]
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    rows = [json.loads(line) for line in (Path(config.output_dir) / "step-1" / "metrics.jsonl").open()]
    assert all(row["grad_scale"] > 1 for row in rows)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
