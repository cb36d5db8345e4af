"""--model resolution (aliases, the unavailable paper S, local dir, missing path, hub id offline) and the model
fingerprint."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from lowmem_sdpo.data import load_tokenizer
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.model_aliases import MODEL_ALIASES, resolve_model_alias
from lowmem_sdpo.models import model_fingerprint, resolve_model
from lowmem_sdpo.models import tiny as tiny_module
from tests.support.model_fixtures import write_llama


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
    monkeypatch.setitem(
        tiny_module.TINY_RECIPE["warmup"], "steps", 2
    )  # the path matters here, not the training
    resolved = resolve_model("tiny")
    assert resolved == tiny_module.tiny_model_dir(tmp_path)
    assert (resolved / "config.json").is_file() and (resolved / tiny_module.RECIPE_FILE).is_file()


# Written out from the model cards, not read from MODEL_ALIASES.
PUBLIC_SOLAR = {
    "solar-10.7b": "upstage/SOLAR-10.7B-v1.0",  # the base: pre-trained only
    "solar-10.7b-instruct": "upstage/SOLAR-10.7B-Instruct-v1.0",  # SFT + DPO on the paper's two datasets
}


@pytest.mark.parametrize(("alias", "repo_id"), sorted(PUBLIC_SOLAR.items()))
def test_solar_aliases_resolve_to_the_models_they_are_named_for(empty_hub_cache, llama_dir, alias, repo_id):
    assert resolve_model_alias(alias) == repo_id
    # ... and resolve_model fetches exactly that repo (here: its snapshot in the offline hub cache).
    org, name = repo_id.split("/")
    repo = empty_hub_cache / f"models--{org}--{name}"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    assert resolve_model(alias).resolve() == (repo / "snapshots" / commit).resolve()


def _assert_names_the_alternatives(message: str) -> None:
    assert "\n" not in message
    assert message.startswith("model 'solar-10.7b-sft' is the paper's S (SOLAR-10.7B-v1.0 after SFT)")
    assert "--model solar-10.7b-instruct" in message and "DPO-aligned" in message
    assert "local SFT checkpoint directory" in message


def test_the_papers_sft_model_is_refused_naming_the_alternatives(empty_hub_cache):
    # It must never silently become SOLAR-10.7B-Instruct, which is already DPO-trained on the paper's data.
    for resolve in (resolve_model_alias, resolve_model, load_tokenizer):
        with pytest.raises(InputError) as err:
            resolve("solar-10.7b-sft")
        _assert_names_the_alternatives(str(err.value))


def test_the_sft_recipe_writes_s_where_its_alias_looks():
    # The alias sits below the sft pipeline and names the directory; the recipe and sft's run layout must agree.
    from pathlib import Path

    from lowmem_sdpo.sft.recipes import SFT_RECIPES
    from lowmem_sdpo.sft.train import MODEL_DIR

    built_at = MODEL_ALIASES["solar-10.7b-sft"].built_at
    assert Path(SFT_RECIPES["solar-10.7b-sft"].output_dir) / MODEL_DIR == Path(built_at)


def test_a_model_built_on_first_use_gives_its_tokenizer_through_its_directory(monkeypatch, tmp_path):
    # The data layer builds no model: for smollm2 it asks for the directory, which the models layer builds (here a
    # stand-in build), and the tiny models' bundled tokenizer is read without building them.
    from lowmem_sdpo.models import resolve as resolve_module
    from lowmem_sdpo.models.resolve import tokenizer_location

    target = "builtin:smollm2-135m-instruct-q4"
    with pytest.raises(InputError, match="tokenizer_location"):
        load_tokenizer("smollm2-135m-instruct-q4")
    monkeypatch.setitem(resolve_module.BUILTINS, target, lambda: tmp_path / "built")
    assert tokenizer_location("smollm2-135m-instruct-q4") == str(tmp_path / "built")
    monkeypatch.setitem(resolve_module.BUILTINS, "builtin:tiny", lambda: pytest.fail("tiny was built"))
    assert tokenizer_location("tiny") == "tiny"
    assert load_tokenizer(tokenizer_location("tiny")).eos_token_id is not None


def test_unavailable_aliases_point_at_available_ones():
    unavailable = [a for a in MODEL_ALIASES.values() if not a.available]
    assert [a.name for a in unavailable] == ["solar-10.7b-sft"]
    available = {a.name for a in MODEL_ALIASES.values() if a.available}
    for alias in unavailable:
        named = {word for word in alias.unavailable_reason.replace(",", " ").split() if word in available}
        assert named, alias.name


def test_usage_line_exits_2_naming_the_alternatives_and_writes_nothing(
    empty_hub_cache, tmp_path, monkeypatch, capsys
):
    # The README's usage line, as typed (no --output-dir): refused before any model or data is fetched.
    from lowmem_sdpo.cli import main

    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["run", "--model", "solar-10.7b-sft", "--steps", "openorca,ultrafeedback", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    _assert_names_the_alternatives(err[len("error: ") :].strip())
    assert sorted(tmp_path.rglob("*")) == before


def test_local_directory_is_returned_as_is(llama_dir, monkeypatch):
    assert resolve_model(str(llama_dir)) == llama_dir
    monkeypatch.chdir(llama_dir.parent)
    assert resolve_model("./llama").resolve() == llama_dir.resolve()


@pytest.mark.parametrize(
    "target", ["./no/such/model", "/definitely/missing/model-dir", "~/no-such-model-dir-xyz"]
)
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
