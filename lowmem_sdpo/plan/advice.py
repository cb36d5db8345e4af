"""Which flags make a plan fit: the plan re-run on milder-to-harsher settings of a few knobs.

Each knob alone (its mildest value that fits), then pairs of knobs, then all three; a smaller micro-batch comes
with a larger --grad-accum so that the pairs per optimiser step stay the same.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from lowmem_sdpo.plan.phases import PlanSettings, build_phases, peak_phase
from lowmem_sdpo.plan.shapes import ModelShapes

MIN_LENGTH = 256  # shorter than this and most preference pairs would be cut
LENGTH_STEP = 256  # --max-length candidates: multiples of this below the current value
MIN_RANK = 4
MAX_SUGGESTIONS = 3


def halvings(value: int, floor: int) -> list[int]:
    """value/2, value/4, ... down to `floor` (included when value is above it)."""
    out = []
    v = value // 2
    while v >= floor:
        out.append(v)
        v //= 2
    if value > floor and (not out or out[-1] != floor):
        out.append(floor)
    return out


def shorter_lengths(value: int) -> list[int]:
    """Multiples of LENGTH_STEP below `value`, longest first, down to MIN_LENGTH."""
    top = (value - 1) // LENGTH_STEP * LENGTH_STEP
    return list(range(top, MIN_LENGTH - 1, -LENGTH_STEP))


@dataclass(frozen=True)
class Knob:
    field: str
    flag: str
    values: Callable[[PlanSettings], list[int]]  # candidate values, mildest first

    def flags(self, settings: PlanSettings, value: int) -> dict[str, int]:
        flags = {self.flag: value}
        if self.field == "batch_size":
            # Keep the effective batch (pairs per optimiser step) where it was.
            total = settings.batch_size * settings.grad_accum
            flags["--grad-accum"] = -(-total // value)
        return flags


KNOBS: tuple[Knob, ...] = (
    Knob("batch_size", "--batch-size", lambda s: halvings(s.batch_size, 1)),
    Knob("max_length", "--max-length", lambda s: shorter_lengths(s.max_length)),
    Knob("lora_r", "--lora-r", lambda s: halvings(s.lora_r, MIN_RANK)),
)


@dataclass(frozen=True)
class Suggestion:
    flags: dict[str, int]
    device_bytes: int
    allocated_bytes: int

    @property
    def args(self) -> str:
        return " ".join(f"{flag} {value}" for flag, value in self.flags.items())


def _device_peak(shapes: ModelShapes, settings: PlanSettings) -> tuple[int, int]:
    peak = peak_phase(build_phases(shapes, settings))
    return peak.device, peak.allocated


def suggest(shapes: ModelShapes, settings: PlanSettings, budget: int) -> list[Suggestion]:
    """For each set of knobs (single knobs first), its mildest setting that fits `budget` bytes on the device,
    unless a smaller set already fits with the same values (the extra knob would change nothing needed);
    at most MAX_SUGGESTIONS, fewest changed knobs first."""
    chosen: dict[tuple[str, ...], dict[str, int]] = {}  # knob fields -> the values that fit
    found: list[tuple[int, Suggestion]] = []
    for n_knobs in range(1, len(KNOBS) + 1):
        for knobs in itertools.combinations(KNOBS, n_knobs):
            grids = [list(enumerate(k.values(settings))) for k in knobs]
            # Mildest first: by the summed number of steps away from the current values, then knob order.
            for combo in sorted(itertools.product(*grids), key=lambda c: sum(i for i, _ in c)):
                values = {k.field: v for k, (_, v) in zip(knobs, combo, strict=True)}
                device, allocated = _device_peak(shapes, replace(settings, **values))
                if device > budget:
                    continue
                redundant = any(
                    set(fields) < set(values) and all(values[f] == v for f, v in fit.items())
                    for fields, fit in chosen.items()
                )
                chosen[tuple(values)] = values
                if not redundant:
                    flags: dict[str, int] = {}
                    for k in knobs:
                        flags |= k.flags(settings, values[k.field])
                    found.append((n_knobs, Suggestion(flags, device, allocated)))
                break
    found.sort(key=lambda item: (item[0], -item[1].device_bytes))
    return [suggestion for _, suggestion in found[:MAX_SUGGESTIONS]]
