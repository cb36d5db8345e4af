"""The plan as rich tables: parts x phases in GiB, the verdict, advice, assumptions, step times."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lowmem_sdpo.plan.phases import CUDA_CONTEXT_BYTES, FRAGMENTATION
from lowmem_sdpo.plan.result import Plan
from lowmem_sdpo.plan.sizes import gib, human

WIDTH = 110  # when stdout is not a terminal (rich would assume 80 and wrap the notes early)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def memory_table(plan: Plan) -> Table:
    table = Table()
    table.add_column("part", no_wrap=True)
    table.add_column("basis", no_wrap=True)
    for phase in plan.phases:
        table.add_column(phase.key, justify="right", no_wrap=True)
    names: dict[str, str] = {}  # part -> basis, in order of first appearance
    for phase in plan.phases:
        for part in phase.peak.parts:
            names.setdefault(part.name, part.basis)
    for name, basis in names.items():
        cells = []
        for phase in plan.phases:
            found = [p.bytes for p in phase.peak.parts if p.name == name]
            cells.append(gib(found[0]) if found else "")
        table.add_row(name, basis, *cells)
    table.add_section()
    table.add_row("allocated (torch max)", "sum", *[gib(p.allocated) for p in plan.phases], style="bold")
    table.add_row(
        f"device (+{FRAGMENTATION:.0%}, +{human(CUDA_CONTEXT_BYTES)})",
        "assumed",
        *[gib(p.device) if p.allocated else "0 (CPU)" for p in plan.phases],
        style="bold",
    )
    return table


def time_table(plan: Plan) -> Table:
    table = Table(title=f"time per step at {plan.tflops:g} TFLOP/s sustained", title_justify="left")
    for name in ("step", "pairs", "tokens", "reference", "training", "total"):
        table.add_column(name, justify="right")
    for t in plan.times:
        table.add_row(
            str(t.step),
            f"{t.pairs:,}",
            f"{t.tokens:,}",
            _duration(t.reference_s),
            _duration(t.training_s),
            _duration(t.total_s),
        )
    return table


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console(width=None if _is_terminal() else WIDTH)

    def say(text: str) -> None:
        console.print(text, soft_wrap=True, highlight=False)

    s, peak = plan.settings, plan.peak
    say(
        f"{plan.model}: peak GPU memory per phase in GiB at --max-length {s.max_length} --batch-size "
        f"{s.batch_size} --lora-r {s.lora_r}"
    )
    console.print(memory_table(plan))
    for phase in plan.phases:
        say(f"  {phase.key}: {phase.title}; {phase.note}; peak: {phase.peak.what}")
    verdict = "fits" if plan.fits else "does NOT fit"
    say(
        f"peak: {peak.key}, {human(peak.device)} on the device ({human(peak.allocated)} allocated): "
        f"{verdict} in --gpu-memory {human(plan.gpu_memory)}"
    )
    if not plan.fits and plan.advice:
        say("these fit:")
        for a in plan.advice:
            say(f"  {a.args}   ({human(a.device_bytes)} on the device)")
    elif not plan.fits:
        say(
            "no setting of --batch-size, --max-length and --lora-r makes it fit: loading alone needs "
            f"{human(plan.phases[0].device)} on the device"
        )
    say("assumptions:")
    for line in plan.assumptions():
        say(f"  - {line}")
    if plan.times:
        console.print(time_table(plan))


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()
