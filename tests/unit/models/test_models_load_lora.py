"""load_quantized without adapters (which modules are 4 bit, how close to fp32) and add_lora."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import QuantSettings, add_lora, dequantize_weight, load_quantized, quantize_weight
from tests.support.model_fixtures import BLOCK_LINEAR, CPU_QUANT, load_fp32, token_batch, write_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # fp32 on disk: the fp32 reference below is then S itself, with no rounding of its own.
    return write_llama(tmp_path_factory.mktemp("load") / "llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(llama_dir):
    return load_fp32(llama_dir)


def _linear4bit_names(model: nn.Module) -> set[str]:
    import bitsandbytes as bnb

    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_block_linears_are_4bit_and_the_rest_stays_in_compute_dtype(llama_dir, reference, compute_dtype):
    quant = QuantSettings(compute_dtype=compute_dtype)
    model = load_quantized(llama_dir, quant=quant)
    expected = {name for name, m in reference.named_modules() if isinstance(m, nn.Linear) and BLOCK_LINEAR.fullmatch(name)}
    assert len(expected) == 2 * 7
    assert _linear4bit_names(model) == expected
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(head) is nn.Linear and type(embed) is nn.Embedding
    assert head.weight.dtype == embed.weight.dtype == quant.torch_compute_dtype
    assert not any(p.requires_grad for p in model.parameters())
    for name in expected:
        assert model.get_submodule(name).weight.quant_state.dtype == quant.torch_compute_dtype


def test_4bit_weights_are_exactly_quantize_weight_of_the_checkpoint(llama_dir, reference):
    # transformers' bitsandbytes path and quantize_weight must agree bit for bit: the exact merge relies on it.
    model = load_quantized(llama_dir, quant=CPU_QUANT)
    for name in _linear4bit_names(model):
        got = model.get_submodule(name).weight
        want = quantize_weight(reference.get_submodule(name).weight, CPU_QUANT, "cpu")
        assert torch.equal(got.data, want.data), name
        assert torch.equal(got.quant_state.absmax, want.quant_state.absmax), name


def test_outputs_match_the_fp32_model(llama_dir, reference):
    model = load_quantized(llama_dir, quant=CPU_QUANT)
    ids = token_batch(reference.config.vocab_size)
    quantized, full = _logits(model, ids), _logits(reference, ids)
    # Loose: NF4 keeps ~4 bits per weight.
    rel = (quantized - full).norm() / full.norm()
    assert 0 < rel < 0.15
    # Tight: the same forward with the dequantised weights put into the fp32 model.
    dense = copy.deepcopy(reference)
    for name in _linear4bit_names(model):
        dense.get_submodule(name).weight.data = dequantize_weight(model.get_submodule(name).weight).float()
    torch.testing.assert_close(quantized, _logits(dense, ids), rtol=1e-4, atol=1e-4)


def test_bad_quant_settings_are_input_errors():
    with pytest.raises(InputError, match="compute_dtype"):
        QuantSettings(compute_dtype="float8")
    with pytest.raises(InputError, match="quant_type"):
        QuantSettings(quant_type="int4")


@pytest.fixture
def quantized(llama_dir):
    return load_quantized(llama_dir, quant=CPU_QUANT)


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def test_fresh_lora_leaves_outputs_unchanged(quantized):
    ids = token_batch(quantized.config.vocab_size)
    before = _logits(quantized, ids)
    policy = add_lora(quantized, r=4, alpha=8, seed=0).eval()
    assert torch.equal(_logits(policy, ids), before)


def test_only_lora_parameters_require_grad(quantized):
    policy = add_lora(quantized, r=4, alpha=8, seed=0)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    lora = set(_lora_params(policy))
    assert trainable == lora
    # One A and one B on each of the 14 block linears, none on lm_head.
    assert len(lora) == 2 * 14
    assert not any("lm_head" in name for name in lora)


def test_lora_trains_through_the_4bit_base(quantized):
    policy = add_lora(quantized, r=4, alpha=8, dropout=0.0, seed=0).train()
    ids = token_batch(quantized.config.vocab_size)
    policy(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in _lora_params(policy).items()}
    assert all(g is not None for g in grads.values())
    # With B = 0 only B gets a gradient at the first step (dL/dA = B^T ...), and it is non-zero.
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)


def test_disable_adapter_gives_the_base_outputs(quantized):
    ids = token_batch(quantized.config.vocab_size)
    base = _logits(quantized, ids)
    policy = add_lora(quantized, r=4, alpha=8, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in _lora_params(policy).items():
        if "lora_B" in name:
            p.data = 0.05 * torch.randn(p.shape, generator=gen)
    adapted = _logits(policy, ids)
    assert (adapted - base).abs().max() > 1e-2
    with policy.disable_adapter():
        assert torch.equal(_logits(policy, ids), base)
    assert torch.equal(_logits(policy, ids), adapted)


def test_seed_makes_lora_init_deterministic_without_touching_global_rng(llama_dir):
    def lora_a(seed: int) -> dict[str, torch.Tensor]:
        model = add_lora(load_quantized(llama_dir, quant=CPU_QUANT), r=4, alpha=8, seed=seed)
        return {name: p.detach().clone() for name, p in _lora_params(model).items() if "lora_A" in name}

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = lora_a(7)
    assert torch.equal(torch.get_rng_state(), state)
    second = lora_a(7)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = lora_a(8)
    assert not any(torch.equal(first[k], other[k]) for k in first)
