"""The embedded tiny model: loadable, cached, deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_sdpo.data import load_tokenizer
from lowmem_sdpo.models import build_tiny_model
from lowmem_sdpo.models import tiny as tiny_module
from tests.support.model_fixtures import read_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-cache"))


def test_build_gives_a_loadable_model_and_tokenizer(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    tokenizer = load_tokenizer(str(tiny_dir))
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == tiny_module.TINY_RECIPE["architecture"]["hidden_size"]
    record = json.loads((tiny_dir / tiny_module.RECIPE_FILE).read_text())
    assert record["recipe"] == tiny_module.TINY_RECIPE
    assert tiny_dir.name == f"tiny-{record['recipe_hash']}"
    # The warm-up did something: the loss went down.
    assert record["last_loss"] < record["first_loss"]
    ids = torch.tensor([tokenizer("1+2=")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # The size model_aliases.py and the README state, by hand: 2 layers of q and o (128 x 128), k and v (64 x 128:
    # 2 kv heads of 32), gate and up (256 x 128), down (128 x 256) and two norms; the embeddings and the untied
    # head (vocabulary x 128 each); the final norm.
    layer = 2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128 + 2 * 128
    assert len(tokenizer) == 103 and not model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 2 * layer + 2 * 103 * 128 + 128 == 321_920


def test_second_call_returns_the_cache_without_rebuilding(tiny_dir, monkeypatch):
    stamps = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("build_tiny_model retrained a cached model")

    monkeypatch.setattr(tiny_module, "train_tiny", no_training)
    assert build_tiny_model(tiny_dir.parent) == tiny_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == stamps


def test_build_is_deterministic(tmp_path, monkeypatch):
    # A 3-step warm-up runs every code path of the build (seeded init, batch sampling, AdamW, save)
    # at a fraction of the full recipe's time.
    monkeypatch.setitem(tiny_module.TINY_RECIPE["warmup"], "steps", 3)
    threads = torch.get_num_threads()
    first = build_tiny_model(tmp_path / "a")
    assert torch.get_num_threads() == threads  # the build's single thread is not left behind
    second = build_tiny_model(tmp_path / "b")
    assert first.name == second.name
    a, b = read_checkpoint(first), read_checkpoint(second)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # A different recipe is a different model in a different directory.
    monkeypatch.setitem(tiny_module.TINY_RECIPE, "seed", 1)
    other = build_tiny_model(tmp_path / "a")
    assert other != first
    assert not torch.equal(read_checkpoint(other)["lm_head.weight"], a["lm_head.weight"])
