"""A whole plan: model shapes, per-phase peaks, the fit verdict with advice, optional step times."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lowmem_sdpo.plan.advice import Suggestion, suggest
from lowmem_sdpo.plan.phases import (
    CUDA_CONTEXT_BYTES,
    DEFAULT_SDPO_STEPS,
    FRAGMENTATION,
    Phase,
    PlanSettings,
    build_phases,
    peak_phase,
)
from lowmem_sdpo.plan.shapes import ModelShapes
from lowmem_sdpo.plan.sizes import human
from lowmem_sdpo.plan.source import meta_model, read_source
from lowmem_sdpo.plan.timing import StepTime, step_times


@dataclass
class Plan:
    model: str
    config_dir: str
    shapes: ModelShapes
    settings: PlanSettings
    gpu_memory: int
    phases: list[Phase]
    advice: list[Suggestion] = field(default_factory=list)
    tokens_per_pair: int | None = None
    tflops: float | None = None
    times: list[StepTime] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return peak_phase(self.phases)

    @property
    def fits(self) -> bool:
        return self.peak.device <= self.gpu_memory

    def assumptions(self) -> list[str]:
        s, shp = self.settings, self.shapes
        steps = (
            f"{s.n_steps} sDPO steps (--steps)"
            if s.pairs_per_step
            else f"{DEFAULT_SDPO_STEPS} sDPO steps (the paper's; --steps sets them)"
        )
        out = [
            f"device = allocated x {1 + FRAGMENTATION:.2f} (caching-allocator slack) + "
            f"{human(CUDA_CONTEXT_BYTES)} CUDA context: both assumed, not measured",
            f"{steps}: the reference pass and training of the last step carry {s.n_steps - 1} finished "
            f"adapter(s) in the frozen delta ({shp.delta_params(s.lora_r, 1):,} parameters each, {s.compute_dtype})",
            f"every row padded to --max-length {s.max_length}; {2 * s.batch_size} rows per training forward, "
            f"{2 * s.reference_units} per reference forward",
            f"{s.compute_dtype} compute, NF4{' + double quantisation' if s.double_quant else ''}, LoRA r "
            f"{s.lora_r} on {len(shp.linears)} block linears (dropout > 0), optimiser {s.optim}, gradient "
            f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
            f"{'Triton' if s.logprob_impl == 'triton' else 'chunked torch'} log-prob kernel",
            "activations follow transformers' Llama layer with SDPA and a padding mask (estimates)",
        ]
        if self.times:
            out.append(
                f"time: {self.tokens_per_pair} tokens per pair (chosen + rejected), {self.tflops:g} TFLOP/s "
                "sustained; 6·P·tokens training (forward, recompute, input gradients) + 2·P·tokens reference"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        shp = self.shapes
        return {
            "model": self.model,
            "config_dir": self.config_dir,
            "settings": asdict(self.settings),
            "shapes": {
                "layers": shp.n_layers,
                "hidden": shp.hidden,
                "intermediate": shp.intermediate,
                "heads": shp.n_heads,
                "kv_heads": shp.n_kv_heads,
                "vocab": shp.vocab,
                "parameters": shp.total_params,
                "block_linears": len(shp.linears),
                "block_linear_parameters": shp.block_params,
                "nf4_bytes": shp.nf4_bytes(self.settings.double_quant),
                "lora_parameters": shp.lora_params(self.settings.lora_r),
                "delta_parameters_per_step": shp.delta_params(self.settings.lora_r, 1),
            },
            "assumptions": {
                "cuda_context_bytes": CUDA_CONTEXT_BYTES,
                "fragmentation": FRAGMENTATION,
                "sdpo_steps": self.settings.n_steps,
                "tokens_per_pair": self.tokens_per_pair,
                "notes": self.assumptions(),
            },
            "phases": [
                {
                    "phase": p.key,
                    "title": p.title,
                    "note": p.note,
                    "peak_moment": p.peak.what,
                    "measured_as": p.measured_as,
                    "parts": [{"name": x.name, "bytes": x.bytes, "basis": x.basis} for x in p.peak.parts],
                    "allocated_bytes": p.allocated,
                    "device_bytes": p.device,
                }
                for p in self.phases
            ],
            "peak": {
                "phase": self.peak.key,
                "allocated_bytes": self.peak.allocated,
                "device_bytes": self.peak.device,
            },
            "gpu_memory_bytes": self.gpu_memory,
            "fits": self.fits,
            "advice": [
                {
                    "flags": a.flags,
                    "args": a.args,
                    "device_bytes": a.device_bytes,
                    "allocated_bytes": a.allocated_bytes,
                }
                for a in self.advice
            ],
            "timing": None
            if not self.times
            else {
                "tflops": self.tflops,
                "tokens_per_pair": self.tokens_per_pair,
                "steps": [{**asdict(t), "total_s": t.total_s} for t in self.times],
                "total_s": sum(t.total_s for t in self.times),
            },
        }


def make_plan(
    model: str,
    settings: PlanSettings,
    *,
    gpu_memory: int,
    tflops: float | None = None,
    tokens_per_pair: int | None = None,
    revision: str | None = None,
) -> Plan:
    from lowmem_sdpo.plan.shapes import model_shapes

    source = read_source(model, revision)
    shapes = model_shapes(meta_model(source, settings.compute_dtype))
    return plan_for_shapes(
        model,
        str(source.config_dir),
        shapes,
        settings,
        gpu_memory=gpu_memory,
        tflops=tflops,
        tokens_per_pair=tokens_per_pair,
    )


def plan_for_shapes(
    model: str,
    config_dir: str,
    shapes: ModelShapes,
    settings: PlanSettings,
    *,
    gpu_memory: int,
    tflops: float | None = None,
    tokens_per_pair: int | None = None,
) -> Plan:
    """The plan for already-read shapes. tokens_per_pair defaults to --max-length (chosen and rejected at
    half the cap each); times need both --steps and --tflops."""
    tokens = tokens_per_pair or settings.max_length
    plan = Plan(
        model,
        config_dir,
        shapes,
        settings,
        gpu_memory,
        build_phases(shapes, settings),
        tokens_per_pair=tokens,
    )
    if not plan.fits:
        plan.advice = suggest(shapes, settings, gpu_memory)
    if tflops and settings.pairs_per_step:
        plan.tflops = tflops
        plan.times = step_times(
            shapes, settings.pairs_per_step, lora_r=settings.lora_r, tokens_per_pair=tokens, tflops=tflops
        )
    return plan
