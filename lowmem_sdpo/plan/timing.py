"""Wall time per sDPO step from token counts and a sustained throughput (--tflops), to order of magnitude.

FLOPs per token of a matmul weight with P elements: 2P forward. Training with a frozen 4-bit base does the
forward (2P), the checkpointed recompute (2P) and the input gradients (2P) but no weight gradients: 6P per
token. The reference pass is one forward, 2P. P counts the block linears, the lm head, the frozen delta and
the LoRA factors, not the input embedding (a lookup). Left out: attention's L² term (at 2048 tokens on
SOLAR ~4% of the forward), dequantisation, the optimiser step, padding, and the drift-sample passes (64 pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_sdpo.plan.shapes import ModelShapes

TRAIN_FLOPS_PER_PARAM_TOKEN = 6  # forward + recompute + input gradients (frozen base: no weight gradients)
REFERENCE_FLOPS_PER_PARAM_TOKEN = 2  # one forward


@dataclass(frozen=True)
class StepTime:
    step: int
    pairs: int
    tokens: int
    reference_flops: float
    training_flops: float
    reference_s: float
    training_s: float

    @property
    def total_s(self) -> float:
        return self.reference_s + self.training_s


def matmul_params(shapes: ModelShapes, lora_r: int, adapters: int) -> int:
    return (
        shapes.block_params
        + shapes.head_params
        + shapes.delta_params(lora_r, adapters)
        + shapes.lora_params(lora_r)
    )


def step_times(
    shapes: ModelShapes, pairs_per_step: tuple[int, ...], *, lora_r: int, tokens_per_pair: int, tflops: float
) -> list[StepTime]:
    """Step t (1-based) runs with t - 1 finished adapters in the delta."""
    rate = tflops * 1e12
    out = []
    for t, pairs in enumerate(pairs_per_step, start=1):
        params = matmul_params(shapes, lora_r, t - 1)
        tokens = pairs * tokens_per_pair
        ref = REFERENCE_FLOPS_PER_PARAM_TOKEN * params * tokens
        train = TRAIN_FLOPS_PER_PARAM_TOKEN * params * tokens
        out.append(StepTime(t, pairs, tokens, ref, train, ref / rate, train / rate))
    return out
