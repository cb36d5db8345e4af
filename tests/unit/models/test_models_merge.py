"""M = quantise(S + dW1 + dW2): the exact merge bit for bit, and the inplace merge's extra drift."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import dequantize_weight, load_quantized, quantize_weight
from tests.support.model_fixtures import (
    CPU_QUANT,
    load_fp32,
    read_checkpoint,
    reference_deltas,
    token_batch,
    write_adapter,
    write_llama,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    # bf16 on disk, fp32 compute: the sum must be rounded to bf16 once before it is quantised.
    model_dir = write_llama(root / "llama", dtype=torch.bfloat16)
    adapters = [write_adapter(model_dir, root / f"a{i}", seed=i) for i in (1, 2)]
    return model_dir, adapters


def _quantized_modules(model) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _assert_same_4bit(got, want, name: str) -> None:
    assert torch.equal(got.data, want.data), f"{name}: packed data"
    got_state, want_state = got.quant_state, want.quant_state
    assert torch.equal(got_state.absmax, want_state.absmax), f"{name}: absmax"
    assert torch.equal(got_state.code, want_state.code), f"{name}: code"
    assert got_state.shape == want_state.shape and got_state.dtype == want_state.dtype, name
    assert got_state.blocksize == want_state.blocksize and got_state.quant_type == want_state.quant_type, name
    assert got_state.nested == want_state.nested, name
    if want_state.nested:  # double quantisation: the absmax are themselves quantised
        assert torch.equal(got_state.offset, want_state.offset), f"{name}: offset"
        assert torch.equal(got_state.state2.absmax, want_state.state2.absmax), f"{name}: absmax of absmax"


def test_exact_merge_is_quantize_of_the_sum_bit_for_bit(setup):
    model_dir, adapters = setup
    model = load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT)
    weights = read_checkpoint(model_dir)
    d1, d2 = (reference_deltas(a, torch.float32) for a in adapters)
    modules = _quantized_modules(model)
    assert set(modules) == set(d1) == set(d2) and len(modules) == 14
    for name, module in modules.items():
        s = weights[f"{name}.weight"]
        summed = (s.float() + d1[name] + d2[name]).to(s.dtype)  # fp32 sum, one rounding to bf16
        _assert_same_4bit(module.weight, quantize_weight(summed, CPU_QUANT, "cpu"), name)
    # Untouched by the adapters: lm_head and the embeddings are S in the compute dtype.
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"].float())
    assert torch.equal(model.get_input_embeddings().weight, weights["model.embed_tokens.weight"].float())


def test_merged_model_matches_peft_with_both_adapters_unmerged(setup):
    from peft import PeftModel

    model_dir, adapters = setup
    merged = load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT)
    plain = load_quantized(model_dir, quant=CPU_QUANT)
    peft_model = PeftModel.from_pretrained(load_fp32(model_dir), str(adapters[0]), adapter_name="a1")
    peft_model.load_adapter(str(adapters[1]), adapter_name="a2")
    peft_model.base_model.set_adapter(["a1", "a2"])
    peft_model.eval()
    ids = token_batch(merged.config.vocab_size)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits.double()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits.double()
        got = merged(input_ids=ids).logits.double()
        plain_out = plain(input_ids=ids).logits.double()
    effect = (want - base).norm()
    assert effect > 0.2 * base.norm()  # the adapters matter ...
    # ... and the merged 4-bit model carries them: it is as close to peft's output as NF4 alone allows
    # (the unadapted 4-bit model's error against fp32), far closer than the adapters' own effect.
    assert (got - want).norm() < 0.3 * effect  # leaving out one adapter gives ~0.9
    assert (got - want).norm() < 2.5 * (plain_out - base).norm()


def _drift(model, weights, deltas) -> float:
    """sqrt(sum over block weights of ||dequant(M) - (S + dW1 + dW2)||^2), in float64."""
    total = 0.0
    for name, module in _quantized_modules(model).items():
        target = weights[f"{name}.weight"].double() + sum(d[name] for d in deltas)
        total += (dequantize_weight(module.weight).double() - target).pow(2).sum().item()
    return total**0.5


def test_inplace_merge_drifts_at_least_as_far_as_exact(setup):
    model_dir, adapters = setup
    weights = read_checkpoint(model_dir)
    deltas = [reference_deltas(a, torch.float64) for a in adapters]
    exact = load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT, merge="exact")
    inplace = load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT, merge="inplace")
    assert _drift(inplace, weights, deltas) >= _drift(exact, weights, deltas) > 0


def test_inplace_merge_requantises_once_per_adapter(setup):
    # M_t = quantise(dequantise(M_{t-1}) + dW_t), starting from quantise(S): one rounding per step.
    model_dir, adapters = setup
    weights = read_checkpoint(model_dir)
    d1, d2 = (reference_deltas(a, torch.float32) for a in adapters)
    inplace = load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT, merge="inplace")
    for name, module in _quantized_modules(inplace).items():
        step0 = quantize_weight(weights[f"{name}.weight"], CPU_QUANT, "cpu")
        step1 = quantize_weight(dequantize_weight(step0) + d1[name], CPU_QUANT, "cpu")
        step2 = quantize_weight(dequantize_weight(step1) + d2[name], CPU_QUANT, "cpu")
        _assert_same_4bit(module.weight, step2, name)


def test_unknown_merge_is_input_error(setup):
    model_dir, adapters = setup
    with pytest.raises(InputError, match="merge 'sum'"):
        load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT, merge="sum")


@pytest.mark.parametrize("merge", ["exact", "inplace"])
def test_merged_linear4bit_modules_hold_their_new_weights_quant_state(setup, merge):
    # bitsandbytes keeps the quant state on the module too (Linear4bit.quant_state) and a back-reference on
    # the weight (Params4bit.module); after a merge both must describe the new weight, as after a plain load.
    model_dir, adapters = setup
    model = load_quantized(model_dir, adapters=adapters, quant=CPU_QUANT, merge=merge)
    modules = _quantized_modules(model)
    assert len(modules) == 14
    for name, module in modules.items():
        assert module.quant_state is module.weight.quant_state, name
        assert module.weight.module is module, name


@pytest.mark.parametrize("merge", ["exact", "inplace"])
def test_merge_leaves_no_reference_to_the_replaced_quant_state(setup, merge):
    import gc
    import weakref

    from lowmem_sdpo.models.adapters import load_all_factors
    from lowmem_sdpo.models.checkpoint import Checkpoint
    from lowmem_sdpo.models.merge import MERGES

    model_dir, adapters = setup
    model = load_quantized(model_dir, quant=CPU_QUANT)
    before = {name: m.weight.quant_state for name, m in _quantized_modules(model).items()}
    absmax = {name: weakref.ref(state.absmax) for name, state in before.items()}
    states = {name: weakref.ref(state) for name, state in before.items()}
    del before
    MERGES[merge](model, Checkpoint(model_dir), load_all_factors(adapters), CPU_QUANT, "cpu", None)
    gc.collect()
    # Every block linear was replaced, and nothing (module attribute included) keeps the old scales alive.
    assert [n for n, ref in states.items() if ref() is not None] == []
    assert [n for n, ref in absmax.items() if ref() is not None] == []
