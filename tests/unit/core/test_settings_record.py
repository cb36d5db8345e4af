"""The settings file guarding `sft` and `self-reward` output directories: written for a new run, refused
without --resume, and a resume with other settings names exactly the settings that differ."""

from __future__ import annotations

import json

import pytest

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.settings_record import check_settings_record, differing_settings

RECORD = {"config": {"lr": 1e-4, "beta": 0.1}, "data_fingerprint": "d1", "export_dtype": "bfloat16"}


def test_differing_settings_names_top_level_keys_and_each_differing_option():
    saved = {"config": {"lr": 1e-4, "beta": 0.1, "gone": 1}, "data_fingerprint": "d1", "old": 2}
    now = {"config": {"lr": 2e-4, "beta": 0.1, "new": 3}, "data_fingerprint": "d2"}
    assert differing_settings(saved, now) == ["config.gone", "config.lr", "config.new", "data_fingerprint", "old"]
    assert differing_settings(saved, saved) == []
    # A part that is a dict on one side only: each of its keys differs.
    assert differing_settings({"train": {"a": 1}}, {"train": None}) == ["train.a"]


def test_new_run_writes_the_record_and_a_rerun_needs_resume_and_the_same_settings(tmp_path):
    path = tmp_path / "run" / "sft.json"
    check_settings_record(path, RECORD, what="SFT run", resume=False, resume_needs_record=True)
    assert json.loads(path.read_text()) == RECORD
    with pytest.raises(InputError, match="already holds an earlier SFT run; pass --resume"):
        check_settings_record(path, RECORD, what="SFT run", resume=False, resume_needs_record=True)
    check_settings_record(path, RECORD, what="SFT run", resume=True, resume_needs_record=True)  # same: fine
    changed = {**RECORD, "config": {**RECORD["config"], "lr": 3e-4}}
    with pytest.raises(InputError, match=r"made with other settings: config\.lr$"):
        check_settings_record(path, changed, what="SFT run", resume=True, resume_needs_record=True)
    assert json.loads(path.read_text()) == RECORD  # a refused resume rewrites nothing


def test_a_directory_without_the_record(tmp_path):
    path = tmp_path / "run" / "selfreward.json"
    # --resume where nothing ran: refused when the record is required, else a new run starts.
    with pytest.raises(InputError, match=r"no SFT run there .*drop --resume to start one"):
        check_settings_record(path, RECORD, what="SFT run", resume=True, resume_needs_record=True)
    assert not path.exists()
    check_settings_record(path, RECORD, what="self-reward run", resume=True, resume_needs_record=False)
    assert json.loads(path.read_text()) == RECORD
    # Something else in the directory: never taken over.
    other = tmp_path / "other" / "selfreward.json"
    other.parent.mkdir()
    (other.parent / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="is not empty and holds no self-reward run"):
        check_settings_record(other, RECORD, what="self-reward run", resume=False, resume_needs_record=False)
    assert not other.exists()
