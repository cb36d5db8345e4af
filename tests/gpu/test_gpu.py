"""The GPU pass: what only a CUDA machine can check. Run with

    LOWMEM_SDPO_TEST_CUDA=1 python -m pytest -m gpu

Every test here is marked `gpu`; conftest.py skips them, naming why, where there is no CUDA device or where
Triton would run interpreted (TRITON_INTERPRET=1, which conftest sets unless LOWMEM_SDPO_TEST_CUDA=1).

(a) the compiled Triton kernel at a realistic shape in bf16, fp16 and fp32, forward and gradients, against
    float64 truth with the same-dtype naive error as the allowance (cut-cross-entropy's rule), and against
    the chunked torch implementation (in bf16 / fp16 with tests/unit/kernels/test_kernels_precision.py's rule: 10x the
    fp32 runs' difference plus each run's dz-rounding bound);
(b) a random Llama loaded in 4 bit on CUDA with bf16 compute, against its dequantised float32 copy on CPU;
(c) a 2-step sDPO run on CUDA whose step-2 cached reference is the step-1 trained policy;
(d) a run started on CPU cannot be resumed on CUDA.
The bodies take the device and dtype as arguments, so they run on CPU too when debugging them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.reference.logps import KEY_METADATA, LogpTable, load_cache
from lowmem_sdpo.engine.rundir.layout import BASE_CACHE, REFERENCE_CACHE
from lowmem_sdpo.engine.units import build_units
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import QuantSettings, dequantize_weight, load_quantized, resolve_model
from lowmem_sdpo_kernels import sequence_logprobs
from tests.support.engine_fixtures import reference_table, run, small_config
from tests.support.half_precision import FACTOR, dz_rounding_bound, fp32_floors
from tests.support.model_fixtures import token_batch, tokenizer_vocab_size, write_llama

pytestmark = pytest.mark.gpu

FP32_EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps
# fp32 roundings the fused ops may add on top of the naive same-dtype error (they accumulate in fp32).
ATOL_ROUNDINGS = 8.0

# (a) ------------------------------------------------------------------------------------------------------

# A SOLAR/Llama-2-like head: 32000 vocabulary; 4 sequences x 512 tokens = 2048 rows; D = 1024.
BATCH, LENGTH, DIM, VOCAB = 4, 512, 1024, 32000


def _inputs(dtype: torch.dtype, device: str, *, logit_scale: float = 4.0, seed: int = 0):
    """hidden [B, T, D] and weight [V, D] in `dtype` (logits of std ~logit_scale), labels [B, T] with the
    first 30% of each row ignored (a prompt), and a float64 upstream gradient [B]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, LENGTH, DIM, generator=gen) * (logit_scale / DIM**0.5)
    weight = torch.randn(VOCAB, DIM, generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    labels[:, : int(0.3 * LENGTH)] = -100
    grad_out = torch.randn(BATCH, generator=gen, dtype=torch.float64)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), labels.to(device), grad_out.to(device)


def _naive_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **_) -> tuple:
    """Full [B, T, V] logits in the inputs' own dtype, then an fp32 (fp64 for fp64 inputs) log-softmax and
    per-sequence sum: written here, independent of lowmem_sdpo_kernels."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax((hidden @ weight.T).to(acc), dim=-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(dim=-1), mask.sum(dim=-1)


def _value_and_grads(fn, hidden, weight, labels, grad_out) -> tuple[torch.Tensor, ...]:
    """float64 (sums [B], d hidden, d weight) of fn on fresh leaves, backpropagating sum(sums * grad_out)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    sums, _ = fn(h, w, labels)
    (sums.double() * grad_out).sum().backward()
    return sums.double(), h.grad.double(), w.grad.double()


def _allowances(truth: tuple[torch.Tensor, ...], logit_max: float) -> list[float]:
    """ATOL_ROUNDINGS fp32 roundings: of the logits (eps32 * |z|max) and of the summed log-prob's own size
    for the values; of the logits relative to each gradient's scale for the gradients."""
    logp, *grads = truth
    z = max(logit_max, 1.0)
    return [ATOL_ROUNDINGS * FP32_EPS * (z + logp.abs().max().item())] + [
        ATOL_ROUNDINGS * FP32_EPS * z * g.abs().max().item() for g in grads
    ]


def _max_errors(got: tuple[torch.Tensor, ...], truth: tuple[torch.Tensor, ...]) -> list[float]:
    return [(g - t).abs().max().item() for g, t in zip(got, truth, strict=True)]


def _impl(name: str, filter_eps: float | str | None = "auto"):
    return lambda h, w, labels: sequence_logprobs(h, w, labels, impl=name, filter_eps=filter_eps)


def check_kernel(dtype: torch.dtype, device: str) -> None:
    hidden, weight, labels, grad_out = _inputs(dtype, device)
    truth = _value_and_grads(_naive_sequence_logprobs, hidden.double(), weight.double(), labels, grad_out)
    naive = _value_and_grads(_naive_sequence_logprobs, hidden, weight, labels, grad_out)
    logit_max = (hidden.double() @ weight.double().T).abs().max().item()
    allow = _allowances(truth, logit_max)
    naive_err = _max_errors(naive, truth)
    names = ("logp_sum", "grad_hidden", "grad_weight")
    # Both fused paths vs float64 truth, each within the naive same-dtype error (default gradient filtering).
    for impl in ("triton", "torch"):
        err = _max_errors(_value_and_grads(_impl(impl), hidden, weight, labels, grad_out), truth)
        for name, e, n, a in zip(names, err, naive_err, allow, strict=True):
            assert e <= n + a, f"{impl} {dtype}: {name} error {e:.3e} > naive {n:.3e} + {a:.3e}"
    # Triton vs torch with filtering off: the same fp32 arithmetic in another order.
    tri = _value_and_grads(_impl("triton", None), hidden, weight, labels, grad_out)
    ref = _value_and_grads(_impl("torch", None), hidden, weight, labels, grad_out)
    if dtype == torch.float32:
        # The sums and the gradients come out in fp32: they agree to fp32 roundings, the gradients up to one
        # final rounding (one ulp, at most eps * |g|).
        rounding = [0.0] + [FP32_EPS * g.abs().max().item() for g in ref[1:]]
        for name, d, r, a in zip(names, _max_errors(tri, ref), rounding, allow, strict=True):
            assert d <= r + a, f"triton vs torch {dtype}: {name} differ by {d:.3e} > {r:.3e} + {a:.3e}"
        return
    # Half inputs: both round dz to the input dtype before the backward's products (on CUDA the torch impl
    # does too) and the finished gradients once more, so the rule of tests/unit/kernels/test_kernels_precision.py holds for
    # their difference: 10x the fp32 runs' own difference (floored at a few fp32 roundings) plus, for each of
    # the two runs, the dz-rounding bound, entry by entry.
    tri32 = _value_and_grads(_impl("triton", None), hidden.float(), weight.float(), labels, grad_out)
    ref32 = _value_and_grads(_impl("torch", None), hidden.float(), weight.float(), labels, grad_out)
    # Per row, as the kernels see it: sequence b's upstream gradient on each of its tokens.
    rows = hidden.reshape(-1, DIM), weight, labels.reshape(-1), grad_out.repeat_interleave(LENGTH)
    rounding = dz_rounding_bound(*rows)
    rounding[1] = rounding[1].reshape(hidden.shape)
    floors = fp32_floors(truth, logit_max)
    for i, name in enumerate(names):
        diff32 = (tri32[i] - ref32[i]).abs().max().item()
        excess = ((tri[i] - ref[i]).abs() - (FACTOR * max(diff32, floors[i]) + 2 * rounding[i])).max().item()
        assert excess <= 0, f"triton vs torch {dtype}: {name} differ by more than allowed, by {excess:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_compiled_triton_kernel_at_a_realistic_shape(dtype):
    check_kernel(dtype, "cuda")


# (b) ------------------------------------------------------------------------------------------------------


def _dense_copy(quantized, model_dir: Path, dtype: torch.dtype):
    """The function the 4-bit model computes, on CPU in `dtype`: every Linear4bit's dequantised weight."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    q_modules = dict(quantized.named_modules())
    for name, module in dense.named_modules():
        q = q_modules.get(name)
        if isinstance(q, bnb.nn.Linear4bit):
            module.weight.data = dequantize_weight(q.weight).float().cpu()
    return dense.to(dtype).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t), fp32."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def check_quantized_load(tmp: Path, device: str, compute_dtype: str) -> None:
    model_dir = write_llama(tmp / "llama", hidden=128)
    quantized = load_quantized(model_dir, quant=QuantSettings(compute_dtype=compute_dtype), device=device)
    assert quantized.device.type == device
    ids = token_batch(tokenizer_vocab_size())
    got = _token_logprobs(_logits(quantized, ids), ids)
    exact_logits = _logits(_dense_copy(quantized, model_dir, torch.float32), ids)
    exact = _token_logprobs(exact_logits, ids)
    # The same dequantised function evaluated in the compute dtype on CPU: the error that dtype costs.
    dtype = getattr(torch, compute_dtype)
    same_dtype = _token_logprobs(_logits(_dense_copy(quantized, model_dir, dtype), ids), ids)
    err = (got - exact).abs().max().item()
    naive_err = (same_dtype - exact).abs().max().item()
    # Another device sums in another order: twice the naive error, plus 4 roundings of the largest logit
    # (a logit's error moves its log-prob by about as much).
    allow = 2 * naive_err + 4 * torch.finfo(dtype).eps * exact_logits.abs().max().item()
    assert err <= allow, f"4-bit on {device}: log-prob error {err:.3e} > {allow:.3e} (naive {naive_err:.3e})"
    # and the comparison can tell models apart: the predictions vary by far more than the allowance
    spread = (exact - exact.mean()).abs().max().item()
    assert spread > 5 * allow, (spread, allow)


def test_quantized_llama_on_cuda_matches_dequantised_float32(tmp_path):
    check_quantized_load(tmp_path, "cuda", "bfloat16")


# (c) ------------------------------------------------------------------------------------------------------


def _cache(run_dir: Path, t: int, name: str) -> LogpTable:
    from safetensors import safe_open

    path = run_dir / f"step-{t}" / name
    with safe_open(str(path), framework="pt") as f:
        key = f.metadata()[KEY_METADATA]
    table = load_cache(path, key, need_kl=False)
    assert table is not None, path
    return table


def _units(model_dir: Path, data: str, config) -> tuple[list, int]:
    tokenizer = load_tokenizer(str(model_dir))
    tokenized = tokenize_step(
        load_steps(data)[0],
        tokenizer,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
    )
    return build_units(tokenized, seed=config.seed, label="x")[0], tokenizer.pad_token_id


def _trained_policy_cpu(model_dir: Path, adapter: Path):
    """P_1 = Q(S) + the step-1 adapter through peft's own LoRA layers, float32 on CPU."""
    from peft import PeftModel

    base = load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def _max_diff(a: LogpTable, b: LogpTable) -> float:
    return max((a.chosen - b.chosen).abs().max().item(), (a.rejected - b.rejected).abs().max().item())


def check_two_step_run(tmp: Path, device: str, **overrides) -> None:
    # --diagnostics also caches S's log-probs on D_2 computed the same way (device, dtype, kernels): its
    # distance from S in float32 on CPU is what this device's arithmetic costs, the yardstick below.
    config = small_config(tmp, "gpu", device=device, diagnostics=True, **overrides)
    summaries = run(config)
    out = Path(config.output_dir)
    assert [s["step"] for s in summaries] == [1, 2]
    for t, summary in enumerate(summaries, start=1):
        assert (out / f"step-{t}" / "summary.json").is_file()
        assert (out / f"step-{t}" / "adapter" / "adapter_model.safetensors").is_file()
        assert summary["memory_kind"] == ("cuda_max_allocated" if device == "cuda" else "cpu_max_rss")
        assert summary["peak_memory_bytes"] > 0
    model_dir = resolve_model("tiny")
    units, pad_id = _units(model_dir, config.steps.split(",")[1], config)
    trained = reference_table(_trained_policy_cpu(model_dir, out / "step-1" / "adapter"), units, pad_id)
    base = reference_table(
        load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32")), units, pad_id
    )
    device_cost = _max_diff(_cache(out, 2, BASE_CACHE), base)
    # + 0.02: the reference goes through the frozen-delta path, S through the plain one; each rounds on its own
    allow = 2 * device_cost + 0.02
    reference_error = _max_diff(_cache(out, 2, REFERENCE_CACHE), trained)
    assert reference_error <= allow, (reference_error, device_cost)
    # The check can fail: had the reference been S as this device computes it, its error would be at least
    # |P_1 - S| - device_cost, which this requires to exceed the allowance.
    moved = _max_diff(trained, base)
    assert moved > allow + device_cost, (moved, allow, device_cost)


def test_two_step_run_on_cuda_caches_the_trained_policy_as_reference(tmp_path):
    check_two_step_run(tmp_path, "cuda")


# (d) ------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _stop(row: dict) -> None:
    raise _Stop


def test_resume_on_another_device_type_is_refused(tmp_path):
    with pytest.raises(_Stop):
        run(small_config(tmp_path, "moved", device="cpu"), callbacks=[_stop])
    with pytest.raises(InputError, match=r"device type: cpu -> cuda"):
        run(small_config(tmp_path, "moved", device="cuda"), resume=True)
