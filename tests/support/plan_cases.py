"""Shared paths and helpers of the plan tests (tests/unit/plan, tests/real): the shipped config fixtures, the
plan's shapes of a model directory, and one real CPU training step's activations against the plan's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem_sdpo.plan import model_shapes
from lowmem_sdpo.plan.source import meta_model, read_source

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
SOLAR = str(FIXTURES / "solar-10.7b")
LLAMA3 = str(FIXTURES / "llama-3-8b")
GIB = 2**30


def shapes_of(model_dir: str | Path, compute_dtype: str):
    return model_shapes(meta_model(read_source(str(model_dir)), compute_dtype))


def cpu_training_activations(
    model_dir: str | Path, *, pairs: int, length: int, prompt: int, dropout_impl: str = "lanes"
) -> tuple[int, int, list[dict[str, Any]]]:
    """(measured, planned, the largest groups alive at the peak) for one optimiser step on CPU as the engine runs
    it: NF4 + fp32 compute, LoRA r 16 with dropout 0.05 (`dropout_impl`), checkpointing, the engine's forward
    and torch log-prob op, `pairs` pairs whose rows are all `length` tokens (`prompt` of them prompt), as the
    plan assumes. Measured: the live tensors at the step's peak from the allocator's events (plan.measure), the
    LoRA gradients (an exact part of the plan, not an activation) taken out. Planned: the training phase's
    activation_bytes of `plan` in its CPU mode for the same settings."""
    import torch

    from lowmem_sdpo.engine.units import Unit, collate_units
    from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized
    from lowmem_sdpo.models.lora import enable_checkpointing
    from lowmem_sdpo.plan import PlanSettings, plan_for_shapes
    from lowmem_sdpo.plan.measure import trace_live_tensors
    from lowmem_sdpo.runtime.hardware import Hardware
    from lowmem_sdpo.runtime.logprobs import batch_logprobs

    model = load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))
    vocab = model.config.vocab_size
    policy = add_lora(model, r=16, dropout=0.05, seed=0, dropout_impl=dropout_impl)
    enable_checkpointing(policy.get_base_model())
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.Generator().manual_seed(0)

    def row(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=ids).tolist()

    batch = collate_units([Unit(row(prompt), row(length - prompt), row(prompt), row(length - prompt))] * pairs, 0)
    hw = Hardware(torch.device("cpu"), "float32")

    def step() -> None:
        logp, _ = batch_logprobs(policy, batch, hw=hw, impl="torch")
        (logp[:pairs] - logp[pairs:]).sum().backward()
        optimizer.step()

    torch.manual_seed(0)
    step()  # the optimiser state is made in the first step; the plan counts it as static
    optimizer.zero_grad(set_to_none=True)
    trace = trace_live_tensors(step, attribute=False)
    grads = {p.grad.untyped_storage().data_ptr() for p in params}
    measured = trace.peak_bytes - trace.bytes_where(lambda a: a.ptr in grads)
    settings = PlanSettings(
        max_length=length, batch_size=pairs, lora_r=16, compute_dtype="float32", logprob_impl="torch",
        optim="adamw", device="cpu", pairs_per_step=(pairs,), lora_dropout_impl=dropout_impl,
    )  # fmt: skip
    plan = plan_for_shapes("m", str(model_dir), shapes_of(model_dir, "float32"), settings, gpu_memory=GIB)
    planned = next(p for p in plan.phases if p.key == "training").activation_bytes
    return measured, planned, trace.top(8)
