"""`lowmem-sdpo plan`: its exact parts against the bytes of real tensors (the tiny model and a 2-layer model of
SOLAR-10.7B's width quantised by bitsandbytes on CPU, real LoRA / frozen delta / 8-bit AdamW state), and its
activation estimates against what autograd keeps and what the log-prob op allocates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized, resolve_model
from lowmem_sdpo.models.adapters import load_all_factors
from lowmem_sdpo.models.blocks import block_linear_names
from lowmem_sdpo.models.frozen_delta import FrozenDelta
from lowmem_sdpo.plan import nf4_size
from lowmem_sdpo.plan.shapes import adamw8bit_state_bytes, block_linears
from lowmem_sdpo.plan.source import meta_model, read_source
from tests.support.model_fixtures import write_adapter
from tests.support.plan_cases import SOLAR, cpu_training_activations, shapes_of

# --- bytes of real tensors ---------------------------------------------------------------------------------


def _state_tensors(state) -> list[torch.Tensor]:
    """Every tensor a bitsandbytes QuantState holds, nested states included, found by walking its attributes
    (not by naming them, so a tensor the plan forgot would still be counted here)."""
    from bitsandbytes.functional import QuantState

    found = []
    for value in vars(state).values():
        if torch.is_tensor(value):
            found.append(value)
        elif isinstance(value, QuantState):
            found += _state_tensors(value)
    return found


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def real_nf4_bytes(model: torch.nn.Module) -> dict[str, int]:
    """module name -> bytes of its Params4bit data plus every tensor of its quant state."""
    import bitsandbytes as bnb

    return {
        name: _nbytes(m.weight.data) + sum(_nbytes(t) for t in _state_tensors(m.weight.quant_state))
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def real_unquantised_bytes(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    params = sum(_nbytes(p) for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit))
    return params + sum(_nbytes(b) for b in model.buffers())


def real_optimizer_state_bytes(params: list[torch.nn.Parameter]) -> int:
    """bitsandbytes AdamW8bit after one step: every distinct state tensor (the shared maps once)."""
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                seen[value.data_ptr()] = _nbytes(value)
    return sum(seen.values())


def _check_exact_parts(model_dir: Path, compute_dtype: str, lora_r: int) -> None:
    shapes = shapes_of(model_dir, compute_dtype)
    model = load_quantized(model_dir, quant=QuantSettings(compute_dtype=compute_dtype))
    real = real_nf4_bytes(model)
    assert sorted(real) == sorted(lin.name for lin in shapes.linears)
    for lin in shapes.linears:
        assert nf4_size(lin.numel).total == real[lin.name], lin.name
    assert shapes.nf4_bytes() == sum(real.values())
    assert shapes.other_param_bytes + shapes.buffer_bytes == real_unquantised_bytes(model)
    policy = add_lora(model, r=lora_r)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert shapes.lora_params(lora_r) == sum(p.numel() for p in trainable)
    assert sorted(shapes.lora_shapes(lora_r)) == sorted(p.numel() for p in trainable)
    assert adamw8bit_state_bytes(shapes.lora_shapes(lora_r)) == real_optimizer_state_bytes(trainable)


def test_exact_parts_equal_the_tiny_models_real_tensors():
    model_dir = resolve_model("tiny")
    # LoRA factors of the tiny model are under bitsandbytes' min_8bit_size: the 32-bit state fallback.
    _check_exact_parts(model_dir, "float32", lora_r=16)


@pytest.fixture(scope="module")
def solar_width_dir(tmp_path_factory) -> Path:
    """A 1-layer random Llama of SOLAR-10.7B's width (hidden 4096, MLP 14336, 32 query / 8 KV heads; about 0.24B
    parameters), bf16 safetensors. Every part checked is per layer or per shape, so one layer and a small
    vocabulary test the same sizes as SOLAR's 48 layers and 32000 tokens, at a third of the bytes written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")  # no memory until here, and no slow init: filled below
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=gen)
    path = tmp_path_factory.mktemp("solar-width") / "model"
    model.save_pretrained(path)
    return path


def test_exact_parts_equal_a_solar_width_models_real_tensors(solar_width_dir):
    # bf16 weights quantised by bitsandbytes on CPU; r 16 LoRA factors (16 x 4096 and up) get 8-bit state.
    _check_exact_parts(solar_width_dir, "bfloat16", lora_r=16)


def test_frozen_delta_size_equals_a_real_frozen_delta(tmp_path):
    model_dir = resolve_model("tiny")
    shapes = shapes_of(model_dir, "float32")
    adapters = [write_adapter(model_dir, tmp_path / f"a{i}", seed=i, r=8) for i in range(3)]
    delta = FrozenDelta.from_factors(load_all_factors(adapters), torch.bfloat16, "cpu")
    assert shapes.delta_params(8, 3) == delta.numel()


def test_block_linears_are_the_engines_block_linears():
    skeleton = meta_model(read_source(SOLAR), "bfloat16")
    assert [lin.name for lin in block_linears(skeleton)] == block_linear_names(skeleton)


# --- activation estimates against what autograd keeps ---------------------------------------------------------


@pytest.mark.parametrize("dropout_impl", ["lanes", "torch"])
def test_one_layers_saved_activations_are_what_autograd_keeps(tmp_path, dropout_impl):
    """One decoder layer's forward with LoRA (dropout 0.05) on 4-bit weights under bf16 autocast, on CPU: the
    storages autograd saves (parameters excluded) against activations.layer_saved in its CPU mode. The LoRA
    factors are cast to bf16 (peft casts a layer's input to the fp32 factors' dtype when it sees no CUDA
    autocast, and autocast then has no factor copies to make), as that mode assumes. Per dropout: torch's CPU
    dropout keeps a bf16 noise tensor, the lane dropout a bool mask (as CUDA's fused dropout does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_sdpo.plan.activations import Batch, layer_saved

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    model = load_quantized(tmp_path / "m", quant=QuantSettings(compute_dtype="bfloat16"))
    policy = add_lora(model, r=16, dropout=0.05, seed=0, dropout_impl=dropout_impl)
    for name, param in policy.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    policy.train()
    params = {p.data_ptr() for p in policy.parameters()}
    rows, length = 2, 256
    ids = torch.randint(0, 1000, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 200:] = 0  # padding: transformers passes SDPA a mask, as with real pairs
    saved: dict[int, int] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    layer = policy.get_base_model().model.layers[0]
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        policy.get_base_model().model(input_ids=ids, attention_mask=mask, use_cache=False)
    shapes = shapes_of(tmp_path / "m", "bfloat16")
    expected = layer_saved(shapes, Batch(rows, length), 16, device="cpu", dropout_impl=dropout_impl)
    measured = sum(saved.values())
    assert measured == pytest.approx(expected, rel=0.02), (measured, expected)


class _FreshTensors(TorchDispatchMode):
    """Every tensor an op creates (an output whose storage is none of the op's inputs'): what a call
    allocates, found from the ops that ran, not from the code's own account of them. Only (shape, bytes,
    dtype, storage) are kept: holding the tensors would make autograd copy the gradient it hands to hidden.grad."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[tuple[int, ...], int, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if torch.is_tensor(a)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in given:
                self.made.append((tuple(t.shape), _nbytes(t), t.dtype, t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("ignored", [300, 0])
def test_row_compaction_and_gradient_scatter_are_what_the_op_allocates(impl, ignored):
    """The plan's copy of the labelled rows (forward) and index_select's gradient scatter (backward) against the
    tensors the op really makes, per impl, as the engine calls it (rows= from the host labels; Triton under
    the interpreter on CPU; bf16, so that the fp32 working buffers are told apart from copies by their dtype).
    Counted independently: forward, every new bf16 tensor of hidden's width (a copy of rows of hidden);
    backward, every new bf16 [N, D] tensor other than the gradient hidden receives."""
    from lowmem_sdpo.plan.activations import Batch, gradient_scatter, row_compaction
    from lowmem_sdpo_kernels import linear_logprobs, valid_rows

    shapes = shapes_of(resolve_model("tiny"), "bfloat16")
    # More rows than the torch impl's row chunk (2048), so that none of its per-chunk buffers is [N, D].
    b = Batch(rows=2, length=1100)
    n, d, v = b.tokens, shapes.hidden, shapes.vocab
    torch.manual_seed(0)
    hidden = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, d) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,))
    targets[:ignored] = -100  # the prompt's tokens
    rows = valid_rows(targets, v)
    with _FreshTensors() as forward:
        logp = linear_logprobs(hidden, weight, targets, impl=impl, rows=rows, filter_eps=None)
    with _FreshTensors() as backward:
        logp.backward(torch.randn(n))
    grad = hidden.grad.untyped_storage().data_ptr()
    half = torch.bfloat16
    copies = sum(size for shape, size, dtype, _ in forward.made if len(shape) == 2 and shape[1] == d and dtype == half)
    scatter = sum(
        size for shape, size, dtype, storage in backward.made if shape == (n, d) and dtype == half and storage != grad
    )
    labelled = n - ignored
    assert row_compaction(shapes, b, impl, labelled) == copies
    assert gradient_scatter(shapes, b, impl, labelled) == scatter
    if impl == "triton":  # rows= is read in place: nothing to copy or scatter, in any case
        assert copies == scatter == 0
    elif ignored:  # the case the terms exist for (the check above must not pass on two zeros)
        assert copies == labelled * d * 2 and scatter == n * d * 2
    # The plan's own figure (M unknown: the worst case) is at least what any labelled count makes.
    assert row_compaction(shapes, b, impl) >= copies and gradient_scatter(shapes, b, impl) >= scatter


@pytest.mark.parametrize("dropout_impl", ["lanes", "torch"])
def test_cpu_training_activations_match_a_real_steps_live_tensors(tmp_path, dropout_impl):
    """The plan's training-phase activations in its CPU mode (fp32, torch log-prob impl) against the live tensors
    at the peak of a real optimiser step (plan_cases.cpu_training_activations): a 4-layer random model of
    SmolLM2's family (Llama, grouped-query attention, tied head), every row padded to max length as the plan
    assumes, with each LoRA dropout (their saved masks differ: bool for lanes, fp32 noise for torch's). The
    real SmolLM2 is checked in tests/real/test_real_plan.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16384,  # 4 x the torch impl's vocabulary chunk, as real vocabularies are many times it
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    measured, planned, top = cpu_training_activations(
        tmp_path / "m", pairs=2, length=128, prompt=16, dropout_impl=dropout_impl
    )
    assert measured == pytest.approx(planned, rel=0.15), (measured, planned, top)
