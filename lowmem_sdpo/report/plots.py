"""The report's figures: a registry of plot functions, each drawing one PNG from a RunData (or nothing, when
the run lacks what it needs). matplotlib's object API with the Agg canvas: no pyplot, no global backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.report.rundata import RunData

DPI = 100
HIST_BINS = 30
MARKERS_UP_TO = 40  # points per line drawn with markers
GIB = 2**30
S_COLOUR, REF_COLOUR, EVAL_COLOUR = "tab:blue", "tab:orange", "tab:green"


@dataclass(frozen=True)
class Plot:
    file: str
    title: str  # the heading the report gives it
    draw: Callable[[RunData], Any]  # -> a matplotlib Figure, or None when the run has nothing to show


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png")  # into the report's temp directory, renamed into place as a whole


def _legend_below(ax: Any, columns: int = 2) -> None:
    """A legend under the axes, where it can cover no bar or point."""
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=columns, frameon=False)


def gamma_histograms(data: RunData) -> Any:
    """The paper's Figure 2: per step, the per-pair log-ratio log pi(y_w|x) - log pi(y_l|x) on D_t under S and
    under the reference M_{t-1}, means marked. Step 1's reference is S itself."""
    steps = [s for s in data.steps if s.ratios_s is not None or s.ratios_ref is not None]
    if not steps:
        return None
    fig = _figure(4.2 * len(steps), 3.8)
    axes = fig.subplots(1, len(steps), squeeze=False)[0]
    for ax, step in zip(axes, steps, strict=True):
        drawn = [("S", step.ratios_s, S_COLOUR)]
        if step.ratios_ref is not None:
            drawn.append((f"M_{step.t - 1}", step.ratios_ref, REF_COLOUR))
        values = torch.cat([v for _, v, _ in drawn if v is not None])
        # The central 98% of the pairs: a few confident pairs far out would squeeze the bulk into two bins.
        low, high = (float(q) for q in torch.quantile(values, torch.tensor([0.01, 0.99], dtype=values.dtype)))
        bins = [low + (high - low) * i / HIST_BINS for i in range(HIST_BINS + 1)] if high > low else HIST_BINS
        for name, ratios, colour in drawn:
            if ratios is None:
                continue
            mean = float(ratios.mean())
            shown = ratios.clamp(low, high).numpy()  # the tails go into the edge bins, not out of the picture
            ax.hist(shown, bins=bins, alpha=0.35, color=colour, label=f"{name} (mean {mean:.3f})")
            ax.hist(shown, bins=bins, histtype="step", color=colour, linewidth=1.2)
            ax.axvline(mean, color=colour, linestyle="--", linewidth=1.8)
        ax.set_title(f"step {step.t}: reference on D_{step.t}")
        ax.set_xlabel("log p(chosen) - log p(rejected)  (1st-99th percentile)")
        ax.set_ylabel("pairs")
        _legend_below(ax)
    return fig


Points = list[tuple[int, dict[str, Any]]]


def _global_steps(data: RunData) -> tuple[list[Points], list[float]]:
    """Per sDPO step, [(optimiser step counted across the run, row)]; and where each step after the first
    begins (between its first optimiser step and the previous step's last)."""
    segments, boundaries, offset = [], [], 0
    for step in data.steps:
        if offset:
            boundaries.append(offset + 0.5)
        segments.append([(offset + r["opt_step"], r) for r in step.rows])
        offset += len(step.rows)
    return segments, boundaries


def _plot_segments(ax: Any, segments: list[Points], key: str, colour: str, marker: str, label: str) -> None:
    """One line per sDPO step (a line across a boundary would join two different trainings)."""
    first = True
    for segment in segments:
        points = [(k, r[key]) for k, r in segment if key in r]
        if not points:
            continue
        ax.plot(
            *zip(*points, strict=True),
            color=colour,
            marker=marker if len(points) <= MARKERS_UP_TO else None,  # beyond that, markers hide the line
            linewidth=1.2,
            label=label if first else None,
        )
        first = False


def training_curves(data: RunData) -> Any:
    """Loss, reward accuracy and margin over optimiser steps across all steps, step boundaries marked; held-out
    figures (where the run evaluated) on the accuracy and margin panels."""
    segments, boundaries = _global_steps(data)
    if not any(segments):
        return None
    fig = _figure(8, 7)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, key, label in zip(
        axes,
        ("loss", "reward_accuracy", "reward_margin"),
        ("loss", "reward accuracy", "reward margin"),
        strict=True,
    ):
        _plot_segments(ax, segments, key, S_COLOUR, ".", "training batch")
        _plot_segments(ax, segments, f"eval/{key}", EVAL_COLOUR, "o", "held out")
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    for step, segment in zip(data.steps, segments, strict=True):
        if segment:  # name each sDPO step above its stretch of the top panel
            middle = (segment[0][0] + segment[-1][0]) / 2
            axes[0].text(middle, 1.02, f"step {step.t}", transform=axes[0].get_xaxis_transform(), ha="center")
    axes[-1].set_xlabel("optimiser step (all sDPO steps; dotted: a new step begins)")
    return fig


def heldout_accuracy(data: RunData) -> Any:
    """Held-out reward accuracy of each step's final policy, and its gamma beside the reference's."""
    steps = [s for s in data.steps if s.summary.get("eval")]
    if not steps:
        return None
    fig = _figure(8, 3.4)
    left, right = fig.subplots(1, 2)
    labels = [f"M_{s.t}" for s in steps]
    left.bar(labels, [s.summary["eval"]["reward_accuracy"] for s in steps], color=EVAL_COLOUR)
    left.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    left.set_ylim(0, 1)
    left.set_xlabel("policy after step t")
    left.set_ylabel("held-out reward accuracy")
    positions = list(range(len(steps)))
    width = 0.38
    right.bar([p - width / 2 for p in positions], [s.summary["eval"]["gamma_ref"] for s in steps], width,
              color=REF_COLOUR, label="reference M_{t-1}")
    right.bar([p + width / 2 for p in positions], [s.summary["eval"]["gamma"] for s in steps], width,
              color=EVAL_COLOUR, label="policy M_t")
    right.set_xticks(positions, [f"step {s.t}" for s in steps])
    right.set_ylabel("held-out gamma (mean log-ratio)")
    _legend_below(right)
    return fig


def throughput_memory(data: RunData) -> Any:
    """Training tokens/s per optimiser step, and the peak memory of each phase of each step."""
    segments, boundaries = _global_steps(data)
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    if any(segments):
        _plot_segments(left, segments, "tokens_per_second", S_COLOUR, ".", "training")
        for b in boundaries:
            left.axvline(b, color="grey", linestyle=":", linewidth=1)
    left.set_xlabel("optimiser step")
    left.set_ylabel("training tokens / s")
    left.grid(alpha=0.3)
    phases = list(dict.fromkeys(p for s in data.steps for p in s.summary.get("peak_memory_bytes_by_phase", {})))
    width = 0.8 / max(len(data.steps), 1)
    for i, step in enumerate(data.steps):
        by_phase = step.summary.get("peak_memory_bytes_by_phase", {})
        right.bar([j + i * width for j in range(len(phases))], [by_phase.get(p, 0) / GIB for p in phases], width,
                  label=f"step {step.t}")
    right.set_xticks([j + width * (len(data.steps) - 1) / 2 for j in range(len(phases))], phases)
    kind = data.steps[0].summary.get("memory_kind", "")
    right.set_ylabel("peak memory (GiB" + (", process max RSS)" if kind == "cpu_max_rss" else ", allocated)"))
    right.set_xlabel("phase")
    _legend_below(right, columns=max(len(data.steps), 1))
    return fig


def reference_drift(data: RunData) -> Any:
    """Requantized mode only: how far the reference's log-ratios moved from the trained P_{t-1}'s, beside how
    far the step's own training moved them (summary.json's reference_drift and training_shift)."""
    steps = [s for s in data.steps if s.summary.get("reference") == "requantized" and s.t > 1]
    if not steps:
        return None
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    positions = list(range(len(steps)))
    width = 0.38
    ax.bar([p - width / 2 for p in positions], [s.summary["reference_drift"] for s in steps], width,
           color=REF_COLOUR, label="reference drift (requantisation)")
    ax.bar([p + width / 2 for p in positions], [s.summary["training_shift"] for s in steps], width,
           color=S_COLOUR, label="training shift (the step's own)")
    ax.set_xticks(positions, [f"step {s.t}" for s in steps])
    ax.set_ylabel("mean |change of log-ratio| (nats)")
    _legend_below(ax)
    return fig


PLOTS: tuple[Plot, ...] = (
    Plot("gamma_histograms.png", "Reference log-ratios on D_t: S against M_{t-1} (the paper's Figure 2)",
         gamma_histograms),
    Plot("training_curves.png", "Loss, reward accuracy and margin over training", training_curves),
    Plot("heldout_accuracy.png", "Held-out pairs", heldout_accuracy),
    Plot("throughput_memory.png", "Throughput and peak memory", throughput_memory),
    Plot("reference_drift.png", "Reference drift (requantized mode)", reference_drift),
)


def draw_plots(data: RunData, out: Path) -> list[tuple[Plot, Path]]:
    """Each plot the run has data for, saved under `out`."""
    drawn = []
    for plot in PLOTS:
        fig = plot.draw(data)
        if fig is None:
            continue
        path = out / plot.file
        _save(fig, path)
        drawn.append((plot, path))
    return drawn
