"""No 4-bit layer of ours takes bitsandbytes' CPU inference path, on any host (lowmem_sdpo/models/quant.py).

Every test runs twice through the `bnb_cpu_kind` fixture: as on a host without AVX512-BF16 and as on one with it,
where bitsandbytes would repack a layer's weight at its first eval-mode forward without grad and from then on run
a bf16 kernel with no autograd (`gemv_4bit`). Our reference pass is such a forward and always precedes training.
The references are independent of the code under test: the same model with every 4-bit weight dequantised and
computed in float64, or bitsandbytes' own call counts.
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from lowmem_sdpo.models import (
    QuantSettings,
    add_lora,
    dequantize_weight,
    disable_cpu_repacking,
    load_quantized,
)
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.logprobs import batch_logprobs
from tests.support.engine_fixtures import run, small_config
from tests.support.real_models import VOCAB, write_real_model

CPU_QUANT = QuantSettings(compute_dtype="float32")
CPU = Hardware(torch.device("cpu"), "float32")


def _ids(vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _policy(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA with non-zero B (as after some training), so every factor gets a gradient through the base path."""
    policy = add_lora(model, r=4, alpha=8, dropout=0.0, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return policy


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    return logp.gather(-1, ids[:, 1:, None]).sum()


def _lora_grads(policy: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    policy.train()
    policy.zero_grad(set_to_none=True)
    _loss(policy, ids).backward()
    return {n: p.grad.detach().double().clone() for n, p in policy.named_parameters() if p.requires_grad}


def _reference_pass(policy: torch.nn.Module, ids: torch.Tensor) -> None:
    """What the engine's cached reference pass does to the layers: eval mode, no grad."""
    policy.eval()
    with torch.no_grad():
        policy(input_ids=ids, use_cache=False)


def _float64_twin(policy: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of the 4-bit peft model: every Linear4bit becomes a plain Linear holding its dequantised
    weight (and bias); the LoRA factors and everything else are copied as they are."""
    import copy

    twin = copy.deepcopy(policy)
    for name, module in list(twin.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = torch.nn.Parameter(dequantize_weight(module.weight).float(), requires_grad=False)
            if module.bias is not None:
                dense.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
            parent_name, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent_name), leaf, dense)
    return twin.double()


@pytest.mark.parametrize("arch", ["llama", "phi"])  # Phi: biased block linears (bitsandbytes adds the bias in place)
def test_lora_gradients_after_a_reference_pass_equal_float64(bnb_cpu_kind, tmp_path, arch):
    policy = _policy(load_quantized(write_real_model(arch, tmp_path / arch), quant=CPU_QUANT))
    ids = _ids()
    want = _lora_grads(_float64_twin(policy), ids)
    before = _lora_grads(policy, ids)
    _reference_pass(policy, ids)
    after = _lora_grads(policy, ids)
    assert before.keys() == after.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0, msg=name)
        # fp32 vs float64 over 2 layers: 1e-4 relative to the largest entry of the factor's gradient
        scale = want[name].abs().max().item()
        torch.testing.assert_close(after[name], want[name], atol=1e-4 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_reference_logprobs_after_training_equal_float64(bnb_cpu_kind, tmp_path, arch):
    """The reference pass (eval, no grad) after a training step gives transformers' log_softmax(logits) of the
    float64 twin; on the repacking path the bf16 kernel would be off by about 1e-3 nats."""
    policy = _policy(load_quantized(write_real_model(arch, tmp_path / arch), quant=CPU_QUANT))
    ids = _ids(seed=2)
    _lora_grads(policy, ids)  # a training forward and backward first: it must not crash (Phi did)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    policy.eval()
    with torch.no_grad():
        ours, _ = batch_logprobs(policy, batch, hw=CPU, impl="torch")
        logits = _float64_twin(policy)(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = torch.where(labels != -100, logp, 0.0).sum(-1)
    torch.testing.assert_close(ours.double(), want, atol=1e-4, rtol=0)


def test_an_fp32_cpu_run_never_calls_gemv_4bit(bnb_cpu_kind, tmp_path, monkeypatch):
    calls: list[tuple[int, ...]] = []
    original = bnbf.gemv_4bit

    def counting(A, *args, **kwargs):
        calls.append(tuple(A.shape))
        return original(A, *args, **kwargs)

    monkeypatch.setattr(bnbf, "gemv_4bit", counting)
    run(small_config(tmp_path, n=8))  # two sDPO steps: reference pass, training, merge, second reference pass
    assert calls == []

    # The counter sees the path where bitsandbytes takes it: a layer left as bitsandbytes builds it repacks on a
    # host with the feature, and the switch keeps an identical layer off it.
    layers = [bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32).to("cpu") for _ in range(2)]
    disable_cpu_repacking(layers[1])
    x = torch.randn(3, 64)
    for layer in layers:
        layer.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "an autograd kernel was not registered" for gemv_4bit
            try:
                layer(x)
            except Exception:
                pass
    assert len(calls) == (1 if bnb_cpu_kind == "present" else 0)


def test_a_bitsandbytes_that_repacks_without_the_switch_is_refused():
    from lowmem_sdpo.errors import InputError

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32).to("cpu")
    del layer.support_avx512bf16_for_cpu  # as a bitsandbytes with the repacking under another switch would be
    with pytest.raises(InputError, match=rf"^bitsandbytes {bnb.__version__} repacks .* install bitsandbytes 0\.50$"):
        disable_cpu_repacking(layer)


def test_spawned_processes_see_the_simulated_host(bnb_cpu_kind):
    """The CLI, kill-and-resume and gloo-rank tests run in spawned processes: the simulation must reach them."""
    import subprocess
    import sys

    code = "import bitsandbytes as b; print(b.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == str(bnb_cpu_kind == "present")
