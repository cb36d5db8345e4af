"""Every lm head right: real architectures through the real load path, against transformers' own logits.

Tiny random checkpoints (tests/support/real_models.py) are loaded by load_quantized (block linears in NF4 on CPU,
fp32 compute), so the head spec is read from what a user gets. The reference is transformers' forward itself:
log_softmax(model(...).logits), with the decoder's output captured as a leaf by a forward hook, so the
gradients of the hidden state and of the lm-head weight (and bias) are those of transformers' head code.
"""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import HeadSpec, QuantSettings, check_head, load_quantized, read_head
from lowmem_sdpo.models.head import LOGIT_RULES
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.logprobs import batch_logprobs
from lowmem_sdpo_kernels import linear_logprobs, sequence_logprobs
from tests.support.real_models import ARCHS, available, expected_head, write_real_model

CPU_QUANT = QuantSettings(compute_dtype="float32")
CPU = Hardware(torch.device("cpu"), "float32")
TRANSFORMED = [a for a in ("phi", "gemma2", "cohere", "granite", "recurrent_gemma") if available(a)]
PLAIN = ["llama", "mistral", "qwen2"]
ATOL = 1e-4  # fp32 end to end; the transforms' effects are of order 1 (real_models.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint dir, model loaded by load_quantized), each written and loaded once."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model_dir = write_real_model(name, tmp_path_factory.mktemp(name))
            cache[name] = (model_dir, load_quantized(model_dir, quant=CPU_QUANT, device="cpu"))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def references(models):
    """name -> (targets, grad_out, hidden, logp, d hidden, [d weight, d bias]) from transformers, computed
    once per architecture (a forward through the NF4 blocks on CPU is the slow part of these tests)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            ids, targets, grad_out = _inputs(seed=len(name))
            cache[name] = (targets, grad_out, *_transformers_reference(models(name)[1], ids, targets, grad_out))
        return cache[name]

    return get


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [2, 8], targets [2, 8] with a third ignored, upstream gradient [2, 8]."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 320
    ids = torch.randint(3, vocab, (2, 8), generator=gen)
    targets = torch.randint(0, vocab, (2, 8), generator=gen)
    targets[torch.rand(2, 8, generator=gen) < 0.33] = -100
    return ids, targets, torch.randn(2, 8, generator=gen, dtype=torch.float64)


def _transformers_reference(model, ids, targets, grad_out):
    """Per-token log-probs from transformers' logits, and d/d hidden, d/d lm-head weight and bias of
    sum(grad_out * logp) through transformers' own head code (hidden captured as a leaf)."""
    lm = model.get_output_embeddings()
    params = [p for p in (lm.weight, lm.bias) if p is not None]
    captured: dict[str, torch.Tensor] = {}

    def leaf(module, args, output):
        captured["hidden"] = output.last_hidden_state.detach().requires_grad_(True)
        output.last_hidden_state = captured["hidden"]
        return output

    handle = model.get_decoder().register_forward_hook(leaf)
    for p in params:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=ids, use_cache=False).logits
        logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        logp = torch.where(targets != -100, logp, 0.0)
        (logp * grad_out).sum().backward()
        grads = [p.grad.double() for p in params]
    finally:
        handle.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    hidden = captured["hidden"]
    return hidden.detach(), logp.detach(), hidden.grad.double(), grads


def _ours(spec: HeadSpec, hidden, targets, grad_out, impl: str):
    """linear_logprobs on the same hidden with the head spec, and the same gradients."""
    h = hidden.reshape(-1, hidden.shape[-1]).clone().requires_grad_(True)
    w = spec.weight.detach().clone().requires_grad_(True)
    b = spec.bias.detach().clone().requires_grad_(True) if spec.bias is not None else None
    logp = linear_logprobs(
        h, w, targets.reshape(-1), impl=impl, bias=b, logit_scale=spec.logit_scale, softcap=spec.softcap
    )
    (logp.double() * grad_out.reshape(-1)).sum().backward()
    grads = [w.grad.double()] + ([b.grad.double()] if b is not None else [])
    return logp.double().view(targets.shape), h.grad.double().view(hidden.shape), grads


@pytest.mark.parametrize("name", list(ARCHS))
def test_head_spec_is_read_from_the_real_model(models, name: str) -> None:
    if not available(name):
        pytest.skip(f"this transformers has no {ARCHS[name].model_class}")
    model_dir, model = models(name)
    spec = read_head(model)
    want = {"bias": ARCHS[name].bias_std is not None, "logit_scale": 1.0, "softcap": None}
    want.update(expected_head(name, model_dir))
    got = {"bias": spec.bias is not None, "logit_scale": spec.logit_scale, "softcap": spec.softcap}
    assert got == pytest.approx(want)
    assert spec.weight is model.get_output_embeddings().weight


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
@pytest.mark.parametrize("name", TRANSFORMED)
def test_logprobs_and_gradients_match_transformers(models, references, name: str, impl: str) -> None:
    _, model = models(name)
    targets, grad_out, hidden, ref_logp, ref_dh, ref_grads = references(name)
    logp, dh, grads = _ours(read_head(model), hidden, targets, grad_out, impl)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    torch.testing.assert_close(dh, ref_dh, atol=ATOL, rtol=0)
    assert len(grads) == len(ref_grads)  # the bias gradient exactly where the head has a bias
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TRANSFORMED)
def test_ignoring_the_transform_would_be_caught(models, references, name: str) -> None:
    # The fixtures make each transform matter: the weight-only head (what the code did before) is far off.
    _, model = models(name)
    targets, grad_out, hidden, ref_logp, _, _ = references(name)
    weight_only = HeadSpec(model.get_output_embeddings().weight)
    logp, _, _ = _ours(weight_only, hidden, targets, grad_out, "torch")
    assert (logp - ref_logp).abs().max() > 0.5


def _batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A right-padded batch as the engine sees it: labels already shifted, -100 on the pad and the prompt."""
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2:-1] = ids[:, 3:]
    labels[mask == 0] = -100
    labels[1, -4] = -100  # its next token is padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", [*PLAIN, *TRANSFORMED])
def test_batch_logprobs_equals_transformers_sums(models, name: str) -> None:
    _, model = models(name)
    batch = _batch(_inputs(seed=3)[0])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours, n_tokens = batch_logprobs(model, batch, hw=CPU, impl="torch")
    labels = batch["labels"]
    picked = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(ours.double(), (picked * (labels != -100)).sum(-1), atol=ATOL, rtol=0)
    assert n_tokens.tolist() == (labels != -100).sum(-1).tolist()


@pytest.mark.parametrize("name", PLAIN)
def test_plain_heads_run_exactly_as_before(models, name: str) -> None:
    # Llama / Mistral / Qwen2: no bias, scale 1, no softcap, and batch_logprobs gives bit for bit what the
    # weight-only call (the code before head specs existed) gives.
    _, model = models(name)
    spec = read_head(model)
    assert (spec.bias, spec.logit_scale, spec.softcap) == (None, 1.0, None)
    batch = _batch(_inputs(seed=4)[0])
    with torch.no_grad():
        ours, _ = batch_logprobs(model, batch, hw=CPU, impl="torch")
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        before, _ = sequence_logprobs(hidden, spec.weight, batch["labels"], impl="torch")
    assert torch.equal(ours, before)


def test_a_4bit_lm_head_is_refused_at_load(tmp_path) -> None:
    # A pre-quantised checkpoint whose lm_head was quantised too (bitsandbytes with an empty skip list):
    # the kernels read a full-precision weight, so load_quantized must refuse it, naming the module.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = write_real_model("phi", tmp_path / "phi")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[]
    )
    quantized = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )
    quantized.save_pretrained(str(tmp_path / "phi-4bit-head"))
    with pytest.raises(InputError, match=r"lm head is bitsandbytes\.nn\.modules\.Linear4bit") as err:
        load_quantized(tmp_path / "phi-4bit-head", quant=CPU_QUANT, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", [n for n in ("gemma2", "cohere", "granite") if available(n)])
def test_an_attribute_outside_the_registry_is_refused_by_name(models, name: str) -> None:
    # The same real model read with a registry that lacks its rule: its logits attribute is then an
    # unknown one, and the refusal names it instead of silently ignoring it.
    _, model = models(name)
    config = model.config.to_dict()
    attr = next(a for a in ("final_logit_softcapping", "logit_scale", "logits_scaling") if config.get(a) is not None)
    rules = {k: v for k, v in LOGIT_RULES.items() if k != attr}
    with pytest.raises(InputError, match=rf"config {attr}=") as err:
        read_head(model, rules)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", TRANSFORMED)
def test_probe_refuses_a_spec_that_differs_from_the_forward(models, name: str) -> None:
    # The probe alone (no name rules involved): the model's own forward against a spec that leaves out the
    # transform. The message names the suspect config attribute (Phi's bias has none: it names the spec).
    _, model = models(name)
    spec = read_head(model)
    check_head(model, spec)  # the right spec passes
    wrong = HeadSpec(spec.weight, None, 1.0, None)
    suspect = {"phi": r"\(weight \(320, 64\), no bias", "gemma2": "final_logit_softcapping=5.0",
               "cohere": "logit_scale=4.0", "granite": "logits_scaling=8.0", "recurrent_gemma": "logits_soft_cap=5.0"}
    with pytest.raises(InputError, match=suspect[name]) as err:
        check_head(model, wrong)
    assert "\n" not in str(err.value)
