"""Reading adapters: dW = (alpha / r) B @ A, and one-line InputErrors for adapters that cannot be merged."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import adapter_deltas, export_merged, load_lora_factors, load_quantized
from tests.support.model_fixtures import CPU_QUANT, reference_deltas, write_adapter, write_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model_dir = write_llama(root / "llama")
    adapter = write_adapter(model_dir, root / "a1", seed=1)
    # An adapter trained on a wider model: same module names, other shapes.
    wide_dir = write_llama(root / "wide", hidden=128)
    wide = write_adapter(wide_dir, root / "wide-adapter", seed=1)
    return model_dir, adapter, wide


def _edited(adapter, tmp_path, **changes):
    copy = shutil.copytree(adapter, tmp_path / "edited")
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def _rewrite_tensors(adapter, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(adapter, tmp_path / "edited")
    path = copy / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return copy


def _every_entry_point_refuses(model_dir, adapter, tmp_path, match: str, *, alone: bool = True) -> None:
    """The loader (if the adapter is bad on its own), the merges and the export all say the same one-line
    thing, and the export writes nothing."""
    calls = [lambda: load_lora_factors(adapter)] if alone else []
    calls += [
        lambda: load_quantized(model_dir, adapters=[adapter], quant=CPU_QUANT),
        lambda: load_quantized(model_dir, adapters=[adapter], quant=CPU_QUANT, merge="inplace"),
        lambda: export_merged(model_dir, [adapter], tmp_path / "out"),
    ]
    for call in calls:
        with pytest.raises(InputError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_deltas_match_alpha_over_r_times_b_at_a(setup):
    _, adapter, _ = setup
    want = reference_deltas(adapter, torch.float32)
    got = dict(adapter_deltas(adapter))
    assert got.keys() == want.keys() and len(got) == 14
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_rslora_scaling_is_alpha_over_sqrt_r(setup, tmp_path):
    _, adapter, _ = setup
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_lora_factors(_edited(adapter, tmp_path, use_rslora=True))
    assert all(f.scaling == config["lora_alpha"] / math.sqrt(config["r"]) for f in factors.values())


def test_missing_adapter_config(setup, tmp_path):
    model_dir, adapter, _ = setup
    copy = shutil.copytree(adapter, tmp_path / "no-config")
    (copy / "adapter_config.json").unlink()
    _every_entry_point_refuses(model_dir, copy, tmp_path, r"no adapter_config\.json")


def test_missing_adapter_dir(setup, tmp_path):
    model_dir, _, _ = setup
    _every_entry_point_refuses(model_dir, tmp_path / "never-trained", tmp_path, r"no adapter_config\.json")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("use_dora", True, "DoRA"),
        ("lora_bias", True, "bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("peft_type", "IA3", "peft_type"),
    ],
)
def test_unmergeable_configs(setup, tmp_path, field, value, match):
    model_dir, adapter, _ = setup
    _every_entry_point_refuses(model_dir, _edited(adapter, tmp_path, **{field: value}), tmp_path, match)


def test_shape_mismatch(setup, tmp_path):
    model_dir, _, wide = setup
    _every_entry_point_refuses(model_dir, wide, tmp_path, "does not match the model", alone=False)


@pytest.mark.parametrize("merge", ["exact", "inplace"])
def test_merges_check_shapes_themselves(setup, monkeypatch, merge):
    # A 4-bit checkpoint's headers hold packed shapes, so the up-front check is skipped there and the
    # merges' own check is what stops a wrong adapter: switch the up-front check off to reach it.
    from lowmem_sdpo.models import loading

    model_dir, _, wide = setup
    monkeypatch.setattr(loading, "check_against_checkpoint", lambda factors, checkpoint: None)
    with pytest.raises(InputError, match="does not match the model"):
        load_quantized(model_dir, adapters=[wide], quant=CPU_QUANT, merge=merge)


def test_inconsistent_ranks(setup, tmp_path):
    model_dir, adapter, _ = setup
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"

    def drop_a_rank(tensors):
        tensors[key] = tensors[key][:, :-1].contiguous()

    _every_entry_point_refuses(model_dir, _rewrite_tensors(adapter, tmp_path, drop_a_rank), tmp_path, "same rank")


def test_module_the_model_lacks(setup, tmp_path):
    model_dir, adapter, _ = setup

    def rename(tensors):
        for which in ("A", "B"):
            old = f"base_model.model.model.layers.0.mlp.up_proj.lora_{which}.weight"
            tensors[old.replace("layers.0", "layers.7")] = tensors.pop(old)

    edited = _rewrite_tensors(adapter, tmp_path, rename)
    for call in (
        lambda: load_quantized(model_dir, adapters=[edited], quant=CPU_QUANT),
        lambda: export_merged(model_dir, [edited], tmp_path / "out"),
    ):
        with pytest.raises(InputError, match=r"layers\.7\.mlp\.up_proj"):
            call()
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor(setup, tmp_path):
    _, adapter, _ = setup

    def add_full_weight(tensors):
        tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 4)

    with pytest.raises(InputError, match="unexpected tensor"):
        load_lora_factors(_rewrite_tensors(adapter, tmp_path, add_full_weight))
