"""`lowmem-sdpo plan`: hand-worked figures for the shipped SOLAR and Llama-3-8B configs (parameter counts, NF4
sizes, the log-prob kernel's terms per impl, step times)."""

from __future__ import annotations

import pytest

from lowmem_sdpo.plan import PlanSettings, nf4_size, plan_for_shapes
from tests.support.plan_cases import GIB, LLAMA3, SOLAR, shapes_of


def test_the_training_plan_counts_the_kernel_per_impl():
    """SOLAR at 2048 tokens, one pair: the torch impl's kernel figures carry its compaction and scatter, the
    Triton ones neither (hand-worked), and the training phase takes the figures of the impl it is planned for."""
    from lowmem_sdpo.plan.activations import (
        Batch,
        gradient_scatter,
        kernel_backward,
        kernel_forward,
        kernel_kept,
        row_compaction,
    )

    shapes = shapes_of(SOLAR, "bfloat16")
    b = Batch(rows=2, length=2048)
    n, d = b.tokens, 4096
    assert row_compaction(shapes, b, "torch") == n * d * 2 and gradient_scatter(shapes, b, "torch") == n * d * 2
    assert row_compaction(shapes, b, "triton") == gradient_scatter(shapes, b, "triton") == 0
    # Triton, by hand: 4 fp32 figures per row and vocabulary split (S = 32000 / 128 tiles cut into at most
    # MAX_VOCAB_SPLITS), the lse and two [N] outputs; backward dH in fp32 and in bf16.
    from lowmem_sdpo_kernels.configs import MAX_VOCAB_SPLITS

    tiles = -(-32000 // 128)
    splits = -(-tiles // -(-tiles // min(MAX_VOCAB_SPLITS, tiles)))
    assert kernel_forward(shapes, b, "triton") == 4 * splits * n * 4 + n * 4 + 2 * n * 4
    assert kernel_backward(shapes, b, "triton") == n * d * (4 + 2)
    settings = {"max_length": 2048, "batch_size": 1}
    kernel = {
        impl: next(
            part.bytes
            for phase in plan_for_shapes(
                "solar", SOLAR, shapes, PlanSettings(**settings, logprob_impl=impl), gpu_memory=24 * GIB
            ).phases
            if phase.key == "training"
            for moment in phase.moments
            if moment.what == "the log-prob op's backward"
            for part in moment.parts
            if part.name == "final norm + log-prob kernel"
        )
        for impl in ("triton", "torch")
    }
    assert kernel["torch"] - kernel["triton"] == (
        kernel_kept(shapes, b, "torch") + kernel_backward(shapes, b, "torch")
        - kernel_kept(shapes, b, "triton") - kernel_backward(shapes, b, "triton")
    )  # fmt: skip
    # The torch impl's logits chunk is a forward workspace, freed before the backward: 2048 rows x 4096 fp32.
    assert kernel_forward(shapes, b, "torch") - kernel_kept(shapes, b, "torch") == 2048 * 4096 * 4
    assert kernel_kept(shapes, b, "triton") == kernel_forward(shapes, b, "triton")


def test_solar_and_llama3_fixtures_have_the_public_parameter_counts():
    # SOLAR: 2 x 32000 x 4096 (embeddings, head) + 48 x (2 x 4096^2 + 2 x 1024 x 4096 + 3 x 14336 x 4096
    # + 2 x 4096 norms) + 4096 = 10,731,524,096. Llama-3-8B: 2 x 128256 x 4096 + 32 x the same layer + 4096.
    layer = 2 * 4096**2 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096
    assert shapes_of(SOLAR, "bfloat16").total_params == 2 * 32000 * 4096 + 48 * layer + 4096 == 10_731_524_096
    assert (
        shapes_of(LLAMA3, "bfloat16").total_params == 2 * 128256 * 4096 + 32 * layer + 4096 == 8_030_261_248
    )


def test_solar_hand_worked_parts():
    shapes = shapes_of(SOLAR, "bfloat16")
    # One finished r-16 step: 48 layers x 16 x (sum of in + out over q, k, v, o, gate, up, down = 81,920).
    assert shapes.delta_params(16, 1) == 48 * 16 * 81_920 == 62_914_560
    # The MLP weight 14336 x 4096 in NF4 with double quantisation: 29,360,128 packed bytes, 917,504 uint8
    # absmax, 3,584 fp32 second-level absmax, 256 + 16 fp32 code entries and the 4-byte offset.
    assert nf4_size(14336 * 4096).total == 29_360_128 + 917_504 + 3_584 * 4 + (256 + 16) * 4 + 4
    # Without double quantisation: one fp32 absmax per 64-block.
    assert nf4_size(14336 * 4096, double_quant=False).total == 29_360_128 + 917_504 * 4 + 16 * 4


def test_step_times_are_six_and_two_flops_per_parameter_and_token():
    shapes = shapes_of(SOLAR, "bfloat16")
    settings = PlanSettings(max_length=2048, batch_size=1, pairs_per_step=(12859, 60829))
    plan = plan_for_shapes(
        "solar", SOLAR, shapes, settings, gpu_memory=24 * GIB, tflops=100.0, tokens_per_pair=600
    )
    block = 48 * (2 * 4096**2 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    lora = 62_914_560
    p1 = block + 32000 * 4096 + lora  # step 1: no finished adapter
    p2 = p1 + lora  # step 2: step 1's adapter in the delta
    one, two = plan.times
    assert one.training_flops == 6 * p1 * 12859 * 600 and one.reference_flops == 2 * p1 * 12859 * 600
    assert two.training_flops == 6 * p2 * 60829 * 600
    assert one.training_s == pytest.approx(one.training_flops / 100e12)
