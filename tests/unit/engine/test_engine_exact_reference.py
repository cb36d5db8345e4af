"""M_{t-1} is exactly the trained P_{t-1}: the frozen low-rank delta, the default reference mode, and the drift
that --reference requantized reports at realistic update sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.reference.logps import load_cache
from lowmem_sdpo.engine.rundir.layout import REFERENCE_CACHE
from lowmem_sdpo.engine.units import build_units
from lowmem_sdpo.models import QuantSettings, load_quantized, resolve_model
from lowmem_sdpo.models.adapters import LoraFactor
from lowmem_sdpo.models.frozen_delta import FrozenDelta
from tests.support.engine_fixtures import reference_table, run, small_config, toy_slice

CPU_QUANT = QuantSettings(compute_dtype="float32")


def test_frozen_delta_equals_dense_sum_in_float64():
    """y = x W^T + sum_i s_i x (B_i A_i)^T, against the dense sum formed in float64."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=True).double()
    factors = [
        {
            "lin": LoraFactor(
                torch.randn(4, 24, generator=generator), torch.randn(40, 4, generator=generator), s, False
            )
        }
        for s in (2.0, 0.5, 1.0)
    ]
    model = torch.nn.Sequential()
    model.add_module("lin", linear)
    delta = FrozenDelta.from_factors(factors, torch.float64, "cpu")
    assert delta.deltas["lin"].rank == 12  # r * k
    x = torch.randn(5, 24, generator=generator, dtype=torch.float64)
    before = model(x)
    delta.attach(model)
    dense = linear.weight.detach() + sum(
        f["lin"].scaling * f["lin"].B.double() @ f["lin"].A.double() for f in factors
    )
    expected = x @ dense.T + linear.bias.detach()
    assert torch.allclose(model(x), expected, atol=1e-12, rtol=0)
    delta.detach()
    assert torch.equal(model(x), before)


def test_frozen_delta_refuses_a_wrong_shape():
    from lowmem_sdpo.errors import InputError

    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(8, 8))
    bad = FrozenDelta.from_factors(
        [{"lin": LoraFactor(torch.ones(2, 6), torch.ones(8, 2), 1.0, False)}], torch.float32, "cpu"
    )
    with pytest.raises(InputError, match="module 'lin'"):
        bad.attach(model)


def _units(model_dir: Path, data: Path, config) -> list:
    tokenizer = load_tokenizer(str(model_dir))
    step = load_steps(str(data))[0]
    tokenized = tokenize_step(
        step, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length
    )
    return build_units(tokenized, seed=config.seed, label="x")[0], tokenizer.pad_token_id


def _trained_policy(model_dir: Path, adapters: list[Path]):
    """P = Q(S) + every adapter, through peft's own multi-adapter LoRA layers (not the frozen delta)."""
    from peft import PeftModel

    base = load_quantized(model_dir, quant=CPU_QUANT)
    names = [f"a{i}" for i in range(len(adapters))]
    policy = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        policy.load_adapter(str(path), adapter_name=name)
    policy.base_model.set_adapter(names)
    policy.eval()
    return policy


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exact")
    s3 = toy_slice(tmp / "data" / "s3.jsonl", 2, 16, start=100)
    config = small_config(tmp, "three", n=16, lora_dropout=0.05)
    config.steps += f",{s3}"
    summaries = run(config)
    return tmp, config, summaries


def test_reference_of_step_t_is_the_trained_policy_of_step_t_minus_1(three_steps):
    _, config, summaries = three_steps
    out = Path(config.output_dir)
    model_dir = resolve_model("tiny")
    data = [Path(p) for p in config.steps.split(",")]
    for t in (2, 3):
        chain = [out / c for c in summaries[t - 2]["adapter_chain"]]
        assert len(chain) == t - 1
        units, pad_id = _units(model_dir, data[t - 1], config)
        trained = reference_table(_trained_policy(model_dir, chain), units, pad_id)
        cached = load_cache(out / f"step-{t}" / REFERENCE_CACHE, _key(out, t), need_kl=False)
        assert cached is not None
        for side in ("chosen", "rejected"):
            diff = (getattr(cached, side) - getattr(trained, side)).abs().max()
            assert diff <= 1e-5, (t, side, float(diff))
        # and the step moved: M_{t-1} is not S
        base = reference_table(load_quantized(model_dir, quant=CPU_QUANT), units, pad_id)
        assert (cached.chosen - base.chosen).abs().max() > 1e-3
    for summary in summaries:
        assert summary["reference"] == "exact"
        assert summary["reference_drift"] == 0.0
        # exact mode without --diagnostics skips P_t's pass over the drift sample
        assert summary["training_shift"] is None and summary["drift_sample_units"] == 0


def _key(out: Path, t: int) -> str:
    from safetensors import safe_open

    from lowmem_sdpo.engine.reference.logps import KEY_METADATA

    with safe_open(str(out / f"step-{t}" / REFERENCE_CACHE), framework="pt") as f:
        return f.metadata()[KEY_METADATA]


def _scale_adapter(adapter_dir: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(path))


def _nf4_step_fraction(model_dir: Path, adapter_dir: Path) -> float:
    """max |dW| over the block linears, in units of their NF4 quantisation step (absmax / 7 per 64-block,
    the mean spacing of NF4's 16 levels over [-absmax, absmax] is 2 * absmax / 15)."""
    from lowmem_sdpo.models.adapters import load_lora_factors
    from lowmem_sdpo.models.checkpoint import Checkpoint

    checkpoint = Checkpoint(model_dir)
    fractions = []
    for name, factor in load_lora_factors(adapter_dir).items():
        weight = checkpoint.read(checkpoint.key_for(name)).float()
        step = 2 * weight.reshape(-1, 64).abs().amax(dim=1) / 15
        delta = factor.delta().reshape(-1, 64).abs()
        fractions.append(float((delta / step[:, None]).mean()))
    return sum(fractions) / len(fractions)


class _StopAtStep2(Exception):
    pass


def _stop_at_step_2(row: dict) -> None:
    if row["step"] == 2:
        raise _StopAtStep2


@pytest.mark.parametrize("mode", ["exact", "requantized"])
def test_small_update_drift(tmp_path, mode):
    """Step 1's adapter scaled to ~1% of an NF4 step (the lr 5e-6 regime), then step 2 redone. Requantising
    S + dW_1 re-rolls the rounding: that reference drifts from the trained P_1; the exact one does not."""
    import shutil

    model_dir = resolve_model("tiny")
    config = small_config(tmp_path, mode, n=16, reference=mode, diagnostics=True)  # training_shift in both modes
    with pytest.raises(_StopAtStep2):
        run(config, callbacks=[_stop_at_step_2])
    out = Path(config.output_dir)
    adapter = out / "step-1" / "adapter"
    _scale_adapter(adapter, 0.01 / _nf4_step_fraction(model_dir, adapter))
    assert _nf4_step_fraction(model_dir, adapter) == pytest.approx(0.01, rel=1e-3)
    shutil.rmtree(out / "step-2")
    step2 = run(config, resume=True)[1]
    assert step2["drift_sample_units"] == 16
    if mode == "requantized":
        assert step2["reference_drift"] > 0, step2
    else:
        assert step2["reference_drift"] == 0.0
    assert step2["training_shift"] > 0
