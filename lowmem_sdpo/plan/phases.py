"""The memory plan: each phase of a run as the sum of its parts at its peak moment, on one CUDA device.

A phase may have several candidate moments (training peaks either in the log-prob kernel's backward or in a
layer's recomputed backward); its peak is the largest. Each part is labelled `exact` (tensor bytes that
follow from shapes alone: tested against real tensors) or `estimate` (activations: activations.py).

The figure torch reports as `max_memory_allocated` is the sum of the parts. What the card must have is more:
the CUDA context (cuBLAS, kernels; never seen by torch's allocator) and the caching allocator's slack (blocks
freed but kept, split blocks). Both are stated assumptions, printed with the plan: CUDA_CONTEXT_BYTES and
FRAGMENTATION below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from lowmem_sdpo.engine.config import DRIFT_SAMPLE, RunConfig
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.plan import activations as act
from lowmem_sdpo.plan.activations import Batch
from lowmem_sdpo.plan.shapes import FP32, NF4_BLOCK, ModelShapes, adamw8bit_state_bytes, adamw32_state_bytes
from lowmem_sdpo.plan.sizes import MIB

# Assumptions, not measurements: a CUDA 12/13 context with cuBLAS loaded takes ~400-600 MiB on current cards
# (outside torch's allocator); the caching allocator's reserved memory typically exceeds the allocated peak
# by a few percent in a run of steady shapes.
CUDA_CONTEXT_BYTES = 500 * MIB
FRAGMENTATION = 0.05
DEFAULT_SDPO_STEPS = 2  # the paper's setup, assumed when --steps does not say how many steps there are

_RUN = RunConfig()


@dataclass(frozen=True)
class PlanSettings:
    max_length: int
    batch_size: int = _RUN.batch_size
    lora_r: int = _RUN.lora_r
    grad_accum: int = _RUN.grad_accum
    pairs_per_step: tuple[int, ...] = ()  # from --steps; empty: DEFAULT_SDPO_STEPS steps, no timing
    optim: str = "adamw_8bit"  # --optim auto on CUDA with bitsandbytes
    gradient_checkpointing: bool = _RUN.gradient_checkpointing
    double_quant: bool = _RUN.double_quant
    compute_dtype: str = "bfloat16"  # --compute-dtype auto on an sm80+ card
    reference_batch_size: int = _RUN.reference_batch_size  # 0: auto, 2 x batch_size
    logprob_impl: str = "triton"  # --logprob-impl auto on a card the Triton path runs on; or "torch"
    # "cpu": the activations of the engine's CPU path (activations.DEVICES: two terms differ), checked against
    # a real CPU step's live tensors (tests/unit/plan/test_plan_real_tensors.py). The device figures still add
    # a CUDA context.
    device: str = "cuda"
    lora_dropout_impl: str = _RUN.lora_dropout_impl  # decides the CPU dropout mask's bytes (activations.py)

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "lora_r", "grad_accum"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reference_batch_size < 0:
            raise InputError(f"--reference-batch-size must be at least 0, got {self.reference_batch_size}")
        if self.logprob_impl not in act.KERNEL_IMPLS:
            raise InputError(f"logprob_impl {self.logprob_impl!r}: expected one of {', '.join(act.KERNEL_IMPLS)}")
        if self.device not in act.DEVICES:
            raise InputError(f"--device {self.device}: expected one of {', '.join(act.DEVICES)}")
        if self.lora_dropout_impl not in act.DROPOUT_IMPLS:
            raise InputError(
                f"--lora-dropout-impl {self.lora_dropout_impl}: expected one of {', '.join(act.DROPOUT_IMPLS)}"
            )
        if self.optim not in OPTIMIZER_STATE:
            raise InputError(f"--optim {self.optim}: expected one of auto, {', '.join(OPTIMIZER_STATE)}")

    @property
    def n_steps(self) -> int:
        return len(self.pairs_per_step) or DEFAULT_SDPO_STEPS

    @property
    def reference_units(self) -> int:
        """Pairs per reference forward (engine.config.reference_batch_size's rule)."""
        return self.reference_batch_size or 2 * self.batch_size


# --optim name -> bytes of state for LoRA factors of these sizes. Paged variants hold the same bytes in
# unified memory (outside torch's allocator, but on the card while resident).
OPTIMIZER_STATE: dict[str, Callable[[list[int]], int]] = {
    "adamw_8bit": adamw8bit_state_bytes,
    "paged_adamw_8bit": adamw8bit_state_bytes,
    "adamw": adamw32_state_bytes,
    "adamw_fused": adamw32_state_bytes,
    "paged_adamw_32bit": adamw32_state_bytes,
}


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    basis: str  # "exact" or "estimate"


@dataclass(frozen=True)
class Moment:
    what: str
    parts: tuple[Part, ...]

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    note: str
    moments: tuple[Moment, ...] = field(default=())
    measured_as: str | None = None

    @property
    def peak(self) -> Moment:
        return max(self.moments, key=lambda m: m.total, default=Moment("nothing on the GPU", ()))

    @property
    def allocated(self) -> int:
        return self.peak.total

    @property
    def activation_bytes(self) -> int:
        """The peak moment's parts other than the weights, LoRA, gradients and optimiser state: what a step's
        forward and backward add (the figure compared with a real step's live tensors)."""
        return sum(p.bytes for p in self.peak.parts if p.name not in STATIC_PARTS)

    @property
    def device(self) -> int:
        return device_bytes(self.allocated)


def device_bytes(allocated: int) -> int:
    """What the card needs for a given allocated peak: + fragmentation slack + the CUDA context (if any)."""
    if allocated == 0:
        return 0
    return math.ceil(allocated * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES


# Part names: one row each in the table, the same across phases.
NF4 = "NF4 block weights"
UNQUANTISED = "embeddings, lm head, norms"
DELTA = "frozen delta (earlier steps)"
LORA = "LoRA parameters (fp32)"
GRADS = "LoRA gradients (fp32)"
OPTIM = "optimiser state"
CHECKPOINTS = "checkpointed layer inputs"
ALL_LAYERS = "saved activations, all layers"
MASK = "attention mask + rotary"
RESIDUAL = "residual stream"
LAYER = "one layer's activations"
DEQUANT = "dequantised weight"
KERNEL = "final norm + log-prob kernel"
IN_FLIGHT = "weight being quantised"
# Parts that exist before a step's forward and after its optimiser step (Phase.activation_bytes leaves them out).
STATIC_PARTS = frozenset({NF4, UNQUANTISED, DELTA, LORA, GRADS, OPTIM})


@dataclass(frozen=True)
class Context:
    shapes: ModelShapes
    settings: PlanSettings

    def weights(self) -> tuple[Part, ...]:
        s = self.shapes
        return (
            Part(NF4, s.nf4_bytes(self.settings.double_quant), "exact"),
            Part(UNQUANTISED, s.other_param_bytes + s.buffer_bytes, "exact"),
        )

    def delta(self) -> Part:
        """The delta a step's reference and training run with: the largest at the last step (T - 1 adapters)."""
        adapters = self.settings.n_steps - 1
        return Part(
            DELTA,
            self.shapes.delta_params(self.settings.lora_r, adapters) * self.shapes.element_size,
            "exact",
        )

    def lora(self) -> tuple[Part, ...]:
        """peft keeps LoRA factors in fp32; their gradients too; the optimiser state per --optim."""
        shapes = self.shapes.lora_shapes(self.settings.lora_r)
        params = sum(shapes) * FP32
        return (
            Part(LORA, params, "exact"),
            Part(GRADS, params, "exact"),
            Part(OPTIM, OPTIMIZER_STATE[self.settings.optim](shapes), "exact"),
        )

    def training_batch(self) -> Batch:
        return Batch(rows=2 * self.settings.batch_size, length=self.settings.max_length)

    def reference_batch(self) -> Batch:
        return Batch(rows=2 * self.settings.reference_units, length=self.settings.max_length)


def _no_grad_forward(ctx: Context, static: tuple[Part, ...], b: Batch) -> tuple[Moment, Moment]:
    """A forward without autograd: peaks inside a layer (with the weight being dequantised) or in the
    log-prob op after the last layer."""
    s, impl = ctx.shapes, ctx.settings.logprob_impl
    around = (
        *static,
        Part(MASK, act.mask_and_rotary(s, b), "estimate"),
        Part(RESIDUAL, act.residual_stream(s, b), "estimate"),
    )
    return (
        Moment(
            "a layer's forward",
            (
                *around,
                Part(LAYER, act.layer_forward_transient(s, b), "estimate"),
                Part(DEQUANT, act.dequant_buffer(s), "exact"),
            ),
        ),
        Moment(
            "the log-prob op's forward",
            (*around, Part(KERNEL, act.final_norm_saved(s, b) + act.kernel_forward(s, b, impl), "estimate")),
        ),
    )


def load_phase(ctx: Context) -> tuple[Moment, ...]:
    """transformers loads S tensor by tensor and bitsandbytes quantises each on the device as it arrives: at
    the last one everything else is in place, plus that weight dense in the compute dtype and its fp32
    first-level absmax (before double quantisation)."""
    s = ctx.shapes
    numel = s.largest_linear()
    in_flight = numel * s.element_size + math.ceil(numel / NF4_BLOCK) * FP32
    return (
        Moment("the largest weight quantised last", (*ctx.weights(), Part(IN_FLIGHT, in_flight, "exact"))),
    )


def reference_phase(ctx: Context) -> tuple[Moment, ...]:
    """The no-grad pass of M_{t-1} = Q(S) + delta over D_t at the reference batch size."""
    return _no_grad_forward(ctx, (*ctx.weights(), ctx.delta()), ctx.reference_batch())


def training_phase(ctx: Context) -> tuple[Moment, ...]:
    s, b, r = ctx.shapes, ctx.training_batch(), ctx.settings.lora_r
    static = (*ctx.weights(), ctx.delta(), *ctx.lora(), Part(MASK, act.mask_and_rotary(s, b), "estimate"))
    saved = act.layer_saved(s, b, r, ctx.settings.device, ctx.settings.lora_dropout_impl)
    if ctx.settings.gradient_checkpointing:
        kept = Part(CHECKPOINTS, act.checkpoints(s, b), "estimate")
        layer = saved + act.layer_backward_transient(s, b)
    else:
        kept = Part(ALL_LAYERS, s.n_layers * saved, "estimate")
        layer = act.layer_backward_transient(s, b)
    impl = ctx.settings.logprob_impl
    kernel = act.final_norm_saved(s, b) + act.kernel_kept(s, b, impl) + act.kernel_backward(s, b, impl)
    return (
        Moment("the log-prob op's backward", (*static, kept, Part(KERNEL, kernel, "estimate"))),
        Moment(
            "a layer's recompute and backward",
            (*static, kept, Part(LAYER, layer, "estimate"), Part(DEQUANT, act.dequant_buffer(s), "exact")),
        ),
    )


def between_phase(ctx: Context) -> tuple[Moment, ...]:
    """After training step t (summary.json's "save" phase): P_t scored on the drift sample (no grad, LoRA still
    on, optimiser and gradients already freed) at the reference batch size, at most DRIFT_SAMPLE pairs; then
    the adapter is saved and the LoRA dropped. Step t+1's delta is built in its reference phase."""
    units = min(ctx.settings.reference_units, DRIFT_SAMPLE)
    static = (*ctx.weights(), ctx.delta(), Part(LORA, ctx.lora()[0].bytes, "exact"))
    return _no_grad_forward(ctx, static, Batch(rows=2 * units, length=ctx.settings.max_length))


def export_phase(ctx: Context) -> tuple[Moment, ...]:
    """`lowmem-sdpo export` merges S + sum dW shard by shard on the CPU: nothing on the GPU."""
    return ()


@dataclass(frozen=True)
class PhaseSpec:
    title: str
    moments: Callable[[Context], tuple[Moment, ...]]
    note: str
    # The key of summary.json's peak_memory_bytes_by_phase whose measured peak this phase's prediction is
    # compared with (loading S happens inside step 1's "reference" phase); None: not measured on the GPU.
    measured_as: str | None


PHASES: dict[str, PhaseSpec] = {
    "load": PhaseSpec(
        "load and quantise",
        load_phase,
        "once per run: S in NF4, embeddings / head in the compute dtype",
        "reference",
    ),
    "reference": PhaseSpec(
        "reference pass", reference_phase, "no grad; M_{t-1} = Q(S) + the frozen delta", "reference"
    ),
    "training": PhaseSpec(
        "training", training_phase, "LoRA on M_{t-1}; chosen and rejected in one forward", "train"
    ),
    "between": PhaseSpec(
        "between steps", between_phase, "P_t on the drift sample, adapter saved, LoRA dropped", "save"
    ),
    "export": PhaseSpec("export", export_phase, "runs on the CPU (one shard at a time): no GPU memory", None),
}


def build_phases(shapes: ModelShapes, settings: PlanSettings) -> list[Phase]:
    ctx = Context(shapes, settings)
    return [
        Phase(key, spec.title, spec.note, spec.moments(ctx), spec.measured_as) for key, spec in PHASES.items()
    ]


def peak_phase(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.allocated)
