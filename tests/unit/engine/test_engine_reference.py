"""Reference log-probs: exact against float64, equal to the policy with adapters disabled, cached by key."""

from __future__ import annotations

import random

import pytest
import torch

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.config import RunConfig, build_config, reference_batch_size
from lowmem_sdpo.engine.reference.logps import (
    LogpTable,
    cache_key,
    cached_logps,
    compute_logps,
    load_cache,
    padded_width_tokens,
    plan_batches,
    save_cache,
    unit_length,
)
from lowmem_sdpo.engine.units import Unit, build_units, collate_units
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import QuantSettings, add_lora, dequantize_weight, load_quantized, resolve_model
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.logprobs import batch_logprobs
from lowmem_sdpo.runtime.reporting import Reporter
from tests.support.engine_fixtures import reference_table, toy_slice

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


def test_cached_logps_computes_once_per_key_and_recomputes_a_stale_cache(tmp_path):
    path = tmp_path / "cache.safetensors"
    calls: list[LogpTable] = []

    def compute(value: float) -> LogpTable:
        table = LogpTable(torch.tensor([value, value - 1]), torch.tensor([value - 2, value - 3]))
        calls.append(table)
        return table

    first, reused = cached_logps(path, PARTS, lambda: compute(-1.0), need_kl=False)
    assert not reused and len(calls) == 1 and torch.equal(first.chosen, torch.tensor([-1.0, -2.0]))
    again, reused = cached_logps(path, PARTS, lambda: compute(-5.0), need_kl=False)
    assert reused and len(calls) == 1 and torch.equal(again.rejected, first.rejected)  # read, not computed
    assert load_cache(path, cache_key(PARTS), need_kl=False) is not None  # the first call wrote it
    # Another key, or KL rows the file lacks: computed again, and the new table replaces the cache.
    changed = {**PARTS, "seed_units": 1}
    fresh, reused = cached_logps(path, changed, lambda: compute(-5.0), need_kl=False)
    assert not reused and len(calls) == 2 and torch.equal(fresh.chosen, torch.tensor([-5.0, -6.0]))
    _, reused = cached_logps(path, changed, lambda: compute(-7.0), need_kl=True)
    assert not reused and len(calls) == 3


# --- the reference pass's own batching: length-sorted batches, results in the units' order ---------------


def _stretch(ids: list[int], n: int) -> list[int]:
    """`ids` repeated and cut to n tokens (real token ids, any length)."""
    return (ids * (n // len(ids) + 1))[:n]


def _mixed_units(units: list[Unit], seed: int = 0) -> list[Unit]:
    """The toy units (all 14-15 tokens) stretched to longest rows of 4 to 100 tokens in shuffled order, the
    rejected row shorter than or as long as the chosen one, its prompt taken from another unit (as unpaired
    units have)."""
    rng = random.Random(seed)
    longest = [4 + (96 * k) // (len(units) - 1) for k in range(len(units))]
    rng.shuffle(longest)
    out = []
    for i, (u, total) in enumerate(zip(units, longest, strict=True)):
        other = units[(i + 5) % len(units)]
        shorter = rng.randint(3, total)
        out.append(
            Unit(
                _stretch(u.chosen_prompt, total // 2),
                _stretch(u.chosen, total - total // 2),
                _stretch(other.rejected_prompt, shorter - shorter // 2),
                _stretch(u.rejected, shorter // 2),
            )
        )
    return out


def _alone(model, unit: Unit, pad_id: int) -> tuple[float, float]:
    """(chosen, rejected) summed log-probs of one unit in a forward of its own: no padding, no batch."""
    logp, _ = batch_logprobs(model, collate_units([unit], pad_id), hw=CPU, impl="torch")
    return float(logp[0]), float(logp[1])


def _pass(model, units: list[Unit], pad_id: int, batch_size: int, with_kl: bool) -> LogpTable:
    return compute_logps(
        model,
        units,
        pad_id=pad_id,
        batch_size=batch_size,
        hw=CPU,
        impl="torch",
        with_kl=with_kl,
        reporter=Reporter(True),
        description="reference",
    )


@pytest.fixture(scope="module")
def mixed(setup):
    _, tokenizer, units, model = setup
    return _mixed_units(units), tokenizer.pad_token_id, model


def test_sorted_pass_equals_each_unit_alone_with_kl_rows(mixed):
    units, pad_id, model = mixed
    lengths = [unit_length(units, i) for i in range(len(units))]
    assert max(lengths) > 4 * min(lengths)  # the batches really are reordered and padded
    table = _pass(model, units, pad_id, batch_size=5, with_kl=True)
    with torch.no_grad():
        expected = [_alone(model, u, pad_id) for u in units]
        # KTO's KL rows written out here: unit i's answers under unit i+1's prompts (wrapping around).
        kl_units = [
            Unit(
                units[(i + 1) % len(units)].chosen_prompt,
                u.chosen,
                units[(i + 1) % len(units)].rejected_prompt,
                u.rejected,
            )
            for i, u in enumerate(units)
        ]
        expected_kl = [_alone(model, u, pad_id) for u in kl_units]
    got = {
        "chosen": table.chosen,
        "rejected": table.rejected,
        "kl_chosen": table.kl_chosen,
        "kl_rejected": table.kl_rejected,
    }
    want = {
        "chosen": [c for c, _ in expected],
        "rejected": [r for _, r in expected],
        "kl_chosen": [c for c, _ in expected_kl],
        "kl_rejected": [r for _, r in expected_kl],
    }
    # Sums reach ~150 nats, where one fp32 ulp is 1.5e-5: 1e-5 plus 8 fp32 epsilons of the value (a unit
    # out of place would be off by nats).
    for name, values in want.items():
        torch.testing.assert_close(
            got[name].double(), torch.tensor(values, dtype=torch.float64), atol=1e-5, rtol=1e-6
        )


def test_output_follows_input_order_whatever_the_lengths(mixed):
    """Permutation equivariance: all longest rows differ, so any input order gives the same length-sorted
    batches (same units, same rows, same arithmetic) and the table must be the same values, permuted."""
    units, pad_id, model = mixed
    assert len({unit_length(units, i) for i in range(len(units))}) == len(units)
    perm = random.Random(1).sample(range(len(units)), len(units))
    table = _pass(model, units, pad_id, batch_size=4, with_kl=False)
    permuted = _pass(model, [units[i] for i in perm], pad_id, batch_size=4, with_kl=False)
    assert torch.equal(permuted.chosen, table.chosen[perm])
    assert torch.equal(permuted.rejected, table.rejected[perm])
    assert perm != sorted(perm)


def test_plan_batches_hand_worked():
    # Longest first: 31 (index 5), 30 (1), 28 (3), 7 (2), 6 (4), 5 (0).
    lengths = [5, 30, 7, 28, 6, 31]
    plan = plan_batches(lengths, 2)
    assert plan == [[5, 1], [3, 2], [4, 0]]
    # Widths 31, 28, 6: 2 * 31 + 2 * 28 + 2 * 6 = 130 token positions; in data order the batches
    # (5, 30), (7, 28), (6, 31) are 30, 28 and 31 wide: 2 * 30 + 2 * 28 + 2 * 31 = 178.
    assert padded_width_tokens(lengths, plan) == 130
    assert padded_width_tokens(lengths, [[0, 1], [2, 3], [4, 5]]) == 178
    # Ties keep data order; the last batch takes the remainder.
    assert plan_batches([3, 3, 3, 9, 3], 2) == [[3, 0], [1, 2], [4]]
    assert plan_batches([], 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches([1], 0)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_plan_batches_is_a_partition_into_length_sorted_batches(batch_size):
    lengths = [random.Random(batch_size).randint(1, 50) for _ in range(23)]
    plan = plan_batches(lengths, batch_size)
    assert sorted(i for batch in plan for i in batch) == list(range(23))
    assert all(1 <= len(b) <= batch_size for b in plan) and all(len(b) == batch_size for b in plan[:-1])
    flat = [lengths[i] for batch in plan for i in batch]
    assert flat == sorted(lengths, reverse=True)


def test_sorted_batches_pad_less_than_data_order_on_a_mixed_step(mixed):
    units, pad_id, _ = mixed
    lengths = [unit_length(units, i) for i in range(len(units))]
    sorted_plan = plan_batches(lengths, 4)
    data_order = [list(range(s, min(s + 4, len(units)))) for s in range(0, len(units), 4)]
    # The count is what collation really builds: each batch is [2B, width of its longest unit].
    for batch in sorted_plan + data_order:
        ids = collate_units([units[i] for i in batch], pad_id)["input_ids"]
        assert tuple(ids.shape) == (2 * len(batch), max(lengths[i] for i in batch))
    real = sum(lengths)
    assert padded_width_tokens(lengths, sorted_plan) - real < padded_width_tokens(lengths, data_order) - real


def test_reference_batch_size_auto_is_twice_the_micro_batch():
    assert reference_batch_size(RunConfig(batch_size=3)) == 6
    assert reference_batch_size(RunConfig(batch_size=3, reference_batch_size=5)) == 5


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, True), (-1, False)])
def test_reference_batch_size_validation(tmp_path, value, ok):
    values = {"model": "tiny", "steps": "a.jsonl", "output_dir": str(tmp_path / "r")}
    if ok:
        assert build_config({}, {**values, "reference_batch_size": value}).reference_batch_size == value
    else:
        with pytest.raises(
            InputError, match=r"--reference-batch-size must be at least 0 \(0: auto\), got -1"
        ):
            build_config({}, {**values, "reference_batch_size": value})


def test_reference_batch_size_is_a_run_flag(tmp_path):
    import argparse

    from lowmem_sdpo.cli.run_cmd import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = [
        "--model",
        "tiny",
        "--steps",
        "a.jsonl",
        "--output-dir",
        str(tmp_path),
        "--reference-batch-size",
        "9",
    ]
    assert config_from_args(parser.parse_args(args)).reference_batch_size == 9
    assert "0: auto, 2 x --batch-size" in " ".join(parser.format_help().split())
