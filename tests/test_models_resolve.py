"""--model resolution (alias, local dir, missing path, hub id offline) and the model fingerprint."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from model_fixtures import write_llama

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import model_fingerprint, resolve_model
from lowmem_sdpo.models import tiny as tiny_module


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("resolve") / "llama")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """HF offline, with a hub cache of our own (empty unless a test puts a snapshot in it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_alias_tiny_resolves_to_the_builtin_model(tmp_path, monkeypatch):
    monkeypatch.setenv(tiny_module.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(tiny_module.TINY_RECIPE["warmup"], "steps", 2)  # the path matters here, not the training
    resolved = resolve_model("tiny")
    assert resolved == tiny_module.tiny_model_dir(tmp_path)
    assert (resolved / "config.json").is_file() and (resolved / tiny_module.RECIPE_FILE).is_file()


def test_local_directory_is_returned_as_is(llama_dir, monkeypatch):
    assert resolve_model(str(llama_dir)) == llama_dir
    monkeypatch.chdir(llama_dir.parent)
    assert resolve_model("./llama").resolve() == llama_dir.resolve()


@pytest.mark.parametrize("target", ["./no/such/model", "/definitely/missing/model-dir", "~/no-such-model-dir-xyz"])
def test_missing_path_is_one_line_input_error(target):
    with pytest.raises(InputError) as err:
        resolve_model(target)
    message = str(err.value)
    assert "\n" not in message
    assert target in message and "does not exist" in message


def test_directory_without_config_is_input_error(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(InputError, match=r"has no config\.json"):
        resolve_model(str(tmp_path / "weights"))


def test_hub_id_offline_and_not_cached_is_input_error(empty_hub_cache):
    with pytest.raises(InputError) as err:
        resolve_model("lowmem-sdpo-tests/not-a-real-model")
    message = str(err.value)
    assert "\n" not in message
    assert "lowmem-sdpo-tests/not-a-real-model" in message and "hub" in message


def test_hub_id_offline_uses_the_cached_snapshot(empty_hub_cache, llama_dir):
    # The hub cache layout: models--org--name/refs/main holds the commit, snapshots/<commit>/ the files.
    repo = empty_hub_cache / "models--lowmem-sdpo-tests--cached"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    resolved = resolve_model("lowmem-sdpo-tests/cached")
    assert resolved.resolve() == (repo / "snapshots" / commit).resolve()


def _flip_one_value(path, key: str) -> None:
    """Change the first element of tensor `key` in a safetensors file in place (header untouched)."""
    with path.open("r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        start = 8 + length + header[key]["data_offsets"][0]
        f.seek(start)
        old = f.read(2)
        f.seek(start)
        f.write(bytes([old[0] ^ 0x01, old[1]]))  # lowest mantissa bit of a bf16: a tiny change of one value


def test_fingerprint_is_stable_for_copies(llama_dir, tmp_path):
    copy = shutil.copytree(llama_dir, tmp_path / "copy")
    assert model_fingerprint(llama_dir) == model_fingerprint(llama_dir)
    assert model_fingerprint(copy) == model_fingerprint(llama_dir)


def test_fingerprint_changes_with_one_tensor(llama_dir, tmp_path):
    copy = shutil.copytree(llama_dir, tmp_path / "copy")
    _flip_one_value(copy / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    assert (copy / "model.safetensors").stat().st_size == (llama_dir / "model.safetensors").stat().st_size
    assert model_fingerprint(copy) != model_fingerprint(llama_dir)


def test_fingerprint_changes_with_config(llama_dir, tmp_path):
    copy = shutil.copytree(llama_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != model_fingerprint(llama_dir)
