"""The trackers `--report-to` can name, each used only where its package is installed.

A tracker receives metrics.jsonl's rows, numbers only, at a global optimiser step (counted across the sDPO
steps, so step 2's curves continue step 1's). RowFeed is the trainer callback that does the counting.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lowmem_sdpo.engine.rundir.layout import step_dir
from lowmem_sdpo.engine.rundir.metrics import read_summary
from lowmem_sdpo.errors import InputError

PROJECT = "lowmem-sdpo"


class Tracker(Protocol):
    def log(self, figures: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files under RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, figures: dict[str, float], step: int) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=PROJECT, name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, figures: dict[str, float], step: int) -> None:
        self.run.log(figures, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=run_dir.name, config=config)

    def log(self, figures: dict[str, float], step: int) -> None:
        self.trackio.log(figures, step=step)

    def close(self) -> None:
        self.trackio.finish()


@dataclass(frozen=True)
class TrackerSpec:
    package: str  # the import that must be available
    install: str  # what to pip install
    open: Callable[[Path, dict[str, Any]], Tracker]


# The names here are also engine.config.CHOICES["report_to"] (besides "none").
TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", TensorBoard),
    "wandb": TrackerSpec("wandb", "wandb", WandB),
    "trackio": TrackerSpec("trackio", "trackio", Trackio),
}


def check_tracker(name: str) -> None:
    """Refuses a tracker whose package is missing, before anything slow runs."""
    if name == "none":
        return
    if name not in TRACKERS:
        raise InputError(f"--report-to {name!r}: expected none or one of {', '.join(TRACKERS)}")
    spec = TRACKERS[name]
    if importlib.util.find_spec(spec.package) is None:
        raise InputError(f"--report-to {name}: the {spec.package} package is not installed (pip install {spec.install})")


class RowFeed:
    """A trainer callback: each metrics row's numbers to the tracker at the run-wide optimiser step."""

    def __init__(self, tracker: Tracker, run_dir: Path) -> None:
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self._offsets: dict[int, int] = {}

    def offset(self, t: int) -> int:
        """Optimiser steps of the steps before t (their summaries: a resumed run may not have run them)."""
        if t not in self._offsets:
            done = [read_summary(step_dir(self.run_dir, s)) for s in range(1, t)]
            self._offsets[t] = sum(int(s["optimizer_steps"]) for s in done if s is not None)
        return self._offsets[t]

    def __call__(self, row: dict[str, Any]) -> None:
        figures = {
            k: float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "opt_step")
        }
        # SFT's rows have no sDPO step: one run of optimiser steps, counted as step 1's.
        self.tracker.log(figures, self.offset(int(row.get("step", 1))) + int(row["opt_step"]))

    def close(self) -> None:
        self.tracker.close()


def open_tracker(name: str, run_dir: Path, config: dict[str, Any]) -> RowFeed | None:
    if name == "none":
        return None
    check_tracker(name)
    return RowFeed(TRACKERS[name].open(Path(run_dir), config), run_dir)
