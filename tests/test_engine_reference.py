"""Reference log-probs: exact against float64, equal to the policy with adapters disabled, cached by key."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import reference_table, toy_slice

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.hardware import Hardware
from lowmem_sdpo.engine.logprobs import batch_logprobs
from lowmem_sdpo.engine.reference import LogpTable, cache_key, load_cache, save_cache
from lowmem_sdpo.engine.units import build_units, collate_units
from lowmem_sdpo.models import QuantSettings, add_lora, dequantize_weight, load_quantized, resolve_model

CPU = Hardware(torch.device("cpu"), "float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    model_dir = resolve_model("tiny")
    tokenizer = load_tokenizer(str(model_dir))
    step = load_steps(str(toy_slice(tmp / "s.jsonl", 2, 12)))[0]
    units, _ = build_units(
        tokenize_step(step, tokenizer, max_length=32, max_prompt_length=24), seed=0, label="s"
    )
    model = load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))
    return model_dir, tokenizer, units, model


def _float64_copy(quantized, model_dir):
    """The same function as the 4-bit model, in float64: every Linear4bit replaced by its dequantised weight."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    q_modules = dict(quantized.named_modules())
    for name, module in dense.named_modules():
        q = q_modules.get(name)
        if isinstance(q, bnb.nn.Linear4bit):
            module.weight.data = dequantize_weight(q.weight).float()
    return dense.to(torch.float64).eval()


def test_reference_equals_float64_forward(setup):
    model_dir, tokenizer, units, model = setup
    table = reference_table(model, units, tokenizer.pad_token_id, batch_size=4)
    exact = _float64_copy(model, model_dir)
    batch = collate_units(units, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = exact(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits, dim=-1)
    labels = batch["labels"]  # already shifted: position t scores token t + 1
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    sums = picked.sum(-1)
    b = len(units)
    assert torch.allclose(table.chosen.double(), sums[:b], atol=1e-4, rtol=1e-5)
    assert torch.allclose(table.rejected.double(), sums[b:], atol=1e-4, rtol=1e-5)


def test_reference_equals_policy_with_adapters_disabled(setup):
    _, tokenizer, units, model = setup
    table = reference_table(model, units, tokenizer.pad_token_id, batch_size=4)
    policy = add_lora(model, r=4, alpha=8, dropout=0.0, seed=0)
    try:
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)  # a trained-looking adapter, so "disabled" is a real test
        batch = collate_units(units, tokenizer.pad_token_id)
        policy.eval()
        with torch.no_grad():
            on, _ = batch_logprobs(policy, batch, hw=CPU, impl="torch")
            with policy.disable_adapter():
                off, _ = batch_logprobs(policy, batch, hw=CPU, impl="torch")
        reference = torch.cat([table.chosen, table.rejected])
        assert torch.equal(off.float(), reference)
        assert not torch.allclose(on.float(), reference, atol=1e-3)
    finally:
        policy.unload()  # take the LoRA layers back out of the shared module-scoped model


PARTS = {
    "model": "m" * 64,
    "adapters": ["a" * 64],
    "merge": "exact",
    "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
    "data": "d" * 64,
    "tokenization": {"max_length": 32, "max_prompt_length": 24},
    "seed_units": 0,
    "logprob_impl": "torch",
    "kl_rows": False,
    "device_type": "cpu",
}
CHANGES = {
    "model": "n" * 64,
    "adapters": ["a" * 64, "b" * 64],
    "merge": "inplace",
    "quant": {"quant_type": "nf4", "double_quant": False, "compute_dtype": "float32"},
    "data": "e" * 64,
    "tokenization": {"max_length": 64, "max_prompt_length": 24},
    "seed_units": 1,
    "logprob_impl": "triton",
    "kl_rows": True,
    "device_type": "cuda",
}


@pytest.mark.parametrize("part", sorted(CHANGES))
def test_cache_is_invalidated_by_each_key_part(tmp_path, part):
    assert set(CHANGES) == set(PARTS)
    table = LogpTable(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))
    path = tmp_path / "cache.safetensors"
    key = cache_key(PARTS)
    save_cache(path, key, PARTS, table)
    hit = load_cache(path, key, need_kl=False)
    assert (
        hit is not None
        and torch.equal(hit.chosen, table.chosen)
        and torch.equal(hit.rejected, table.rejected)
    )
    changed = {**PARTS, part: CHANGES[part]}
    assert cache_key(changed) != key
    assert load_cache(path, cache_key(changed), need_kl=False) is None


def test_damaged_cache_is_recomputed_not_trusted(tmp_path):
    path = tmp_path / "cache.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert load_cache(path, cache_key(PARTS), need_kl=False) is None


def test_cache_without_kl_rows_is_not_used_for_kto(tmp_path):
    path = tmp_path / "cache.safetensors"
    save_cache(path, "k", PARTS, LogpTable(torch.zeros(2), torch.zeros(2)))
    assert load_cache(path, "k", need_kl=True) is None
