"""export_merged: S + dW1 + dW2 as a bf16 checkpoint, sharding kept, written atomically."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_sdpo.checks import OUTPUT_MARKER, write_marker
from lowmem_sdpo.models import export_merged
from lowmem_sdpo.models.checkpoint import INDEX_FILE
from tests.support.model_fixtures import read_checkpoint, reference_deltas, write_adapter, write_llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_checkpoint_file(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    # fp32 source so the final cast to bf16 is a real rounding; small shards so there are several files.
    model_dir = write_llama(root / "llama", dtype=torch.float32, max_shard_size="150KB", with_tokenizer=True)
    adapters = [write_adapter(model_dir, root / f"a{i}", seed=i) for i in (1, 2)]
    return model_dir, adapters


def test_sharded_source_keeps_its_index(sharded):
    model_dir, _ = sharded
    assert (model_dir / INDEX_FILE).is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1


def test_export_is_the_float64_sum_cast_once_to_bf16(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, adapters = sharded
    out = export_merged(model_dir, adapters, tmp_path / "merged")
    source = read_checkpoint(model_dir)
    exported = read_checkpoint(out)
    deltas = [reference_deltas(a, torch.float64) for a in adapters]
    adapted = {f"{name}.weight" for name in deltas[0]} | {f"{name}.weight" for name in deltas[1]}
    assert len(adapted) == 14
    assert exported.keys() == source.keys()
    for key, s in source.items():
        if key in adapted:
            name = key.removesuffix(".weight")
            want = (s.double() + deltas[0][name] + deltas[1][name]).to(torch.bfloat16)
        else:
            want = s.to(torch.bfloat16)
        assert exported[key].dtype == torch.bfloat16, key
        assert torch.equal(exported[key], want), key

    # Same sharding: the same files, and an index that names them.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in model_dir.glob("*.safetensors"))
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(source)
    for key, file in index["weight_map"].items():
        assert key in read_checkpoint_file(out / file), key

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.get_submodule("model.layers.1.mlp.down_proj").weight, exported["model.layers.1.mlp.down_proj.weight"])


def test_single_file_source_gets_no_index(tmp_path):
    model_dir = write_llama(tmp_path / "llama", dtype=torch.bfloat16)
    adapter = write_adapter(model_dir, tmp_path / "a1", seed=1)
    out = export_merged(model_dir, [adapter], tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / INDEX_FILE).exists()


def test_failure_midway_leaves_no_output_dir(sharded, tmp_path, monkeypatch):
    import safetensors.torch

    model_dir, adapters = sharded
    real_save = safetensors.torch.save_file
    calls = []

    def fail_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second_shard)
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        export_merged(model_dir, adapters, parent / "merged")
    assert len(calls) == 2  # it did fail midway, after one shard was written
    assert list(parent.iterdir()) == []  # no out dir, no temp dir left behind

    # An existing export (its marker says so) is left as it was.
    (parent / "merged").mkdir()
    (parent / "merged" / "keep.txt").write_text("old")
    write_marker(parent / "merged", "export")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export_merged(model_dir, adapters, parent / "merged")
    assert [p.name for p in parent.iterdir()] == ["merged"]
    assert sorted(p.name for p in (parent / "merged").iterdir()) == sorted([OUTPUT_MARKER, "keep.txt"])
    assert (parent / "merged" / "keep.txt").read_text() == "old"


@pytest.mark.parametrize(("scale", "bf16_keeps"), [(0.05, "all"), (2e-5, "little")])
def test_kept_is_the_written_change_projected_on_the_trained_one(tmp_path, scale, bf16_keeps):
    """DeltaKept against the same figure worked out from the written files, on a bf16 source (as hub models
    are): an update far above a bf16 step survives the cast, one far under it (a short run's size) rounds
    away; float32 keeps everything either way."""
    from lowmem_sdpo.cli.export_cmd import rounding_note
    from lowmem_sdpo.models import DeltaKept

    model_dir = write_llama(tmp_path / "llama", dtype=torch.bfloat16)
    adapter = write_adapter(model_dir, tmp_path / "a", seed=1, scale=scale)
    kept16, kept32 = DeltaKept(), DeltaKept()
    out = export_merged(model_dir, [adapter], tmp_path / "bf16", kept=kept16)
    export_merged(model_dir, [adapter], tmp_path / "fp32", dtype=torch.float32, kept=kept32)

    source, written = read_checkpoint(model_dir), read_checkpoint(out)
    dot = square = 0.0
    for name, delta in reference_deltas(adapter, torch.float64).items():
        change = written[f"{name}.weight"].double() - source[f"{name}.weight"].double()
        dot += float((change * delta).sum())
        square += float(delta.square().sum())
    assert kept16.fraction == pytest.approx(dot / square, rel=1e-9)
    assert kept32.fraction == pytest.approx(1.0, abs=1e-6)
    if bf16_keeps == "all":
        assert kept16.fraction > 0.99 and rounding_note(kept16.fraction, "bfloat16") is None
    else:
        assert kept16.fraction < 0.5
        assert "--dtype float32" in rounding_note(kept16.fraction, "bfloat16")
    assert rounding_note(kept32.fraction, "float32") is None
    assert DeltaKept().fraction is None and rounding_note(None, "bfloat16") is None  # nothing trained


def test_progress_starts_before_the_first_shard(sharded, tmp_path):
    """(description, 0, total) first, so a bar opened on the first call times every shard (a one-shard export
    used to report "1/1 done in 0.0 s"), then one call per shard."""
    model_dir, adapters = sharded
    calls: list[tuple[str, int, int]] = []
    export_merged(model_dir, adapters, tmp_path / "out", progress=lambda *call: calls.append(call))
    n = len(list(model_dir.glob("*.safetensors")))
    assert calls == [("exporting merged model", done, n) for done in range(n + 1)]
