"""`lowmem-sdpo plan`: a run's peak GPU memory per phase, predicted from the model's config alone.

    plan = make_plan("tests/fixtures/solar-10.7b", PlanSettings(max_length=2048), gpu_memory=24 * 2**30)
    plan.peak.device, plan.fits, plan.to_json()

shapes.py: exact NF4 / LoRA / optimiser bytes; activations.py: activation estimates; phases.py: the per-phase
sums and the stated overheads; advice.py: flags that make it fit; timing.py: wall time from token counts.
"""

from lowmem_sdpo.plan.phases import PHASES, Part, Phase, PlanSettings, build_phases
from lowmem_sdpo.plan.result import Plan, make_plan, plan_for_shapes
from lowmem_sdpo.plan.shapes import ModelShapes, model_shapes, nf4_size
from lowmem_sdpo.plan.sizes import parse_size

__all__ = [
    "PHASES",
    "ModelShapes",
    "Part",
    "Phase",
    "Plan",
    "PlanSettings",
    "build_phases",
    "make_plan",
    "model_shapes",
    "nf4_size",
    "parse_size",
    "plan_for_shapes",
]
