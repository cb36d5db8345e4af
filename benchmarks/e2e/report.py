"""The result JSON: rows per (system, shape, phase, step) with medians over the runs, the process row, the table
printed at the end, and the file rewritten atomically after every worker."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import host_record, loadavg, write_json_atomic

from .settings import BETA, LEARNING_RATE, LORA, MAX_GRAD_NORM, ROW_KEYS, SEED, WARMUP_RATIO, Shape


def phase_tokens(phase: str, step: int | None, tokens: list[int]) -> int | None:
    if phase in ("reference", "train", "step") and step is not None and step <= len(tokens):
        return tokens[step - 1]
    if phase == "total":
        return sum(tokens)
    return None


def median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


PHASE_ORDER = {"load": 0, "reference": 1, "train": 2, "drift": 3, "other": 4, "step": 5, "total": 6}


def system_rows(
    system: str,
    shape: Shape,
    runs: list[tuple[dict[str, Any] | None, str, dict[str, Any]]],
    tokens: list[int],
    skip: str | None,
) -> list[dict[str, Any]]:
    """One row per (phase, step): medians over the runs, every run's wall kept."""
    base = {"system": system, "model": shape.model, "shape": shape.name, "seq_len": shape.seq_len}
    if skip is not None:
        return [{**base, **dict.fromkeys(ROW_KEYS[3:]), "phase": "step", "step": 1, "status": f"skipped: {skip}",
                 "error": skip}]  # fmt: skip
    errors = []
    for result, tail, figures in runs:
        if result is None:
            why = "timed out" if figures.get("timed_out") else f"exit {figures.get('returncode')}"
            errors.append(
                f"worker wrote no result ({why}): {tail.strip().splitlines()[-1] if tail.strip() else ''}"
            )
        elif result.get("error"):
            errors.append(result["error"])
    good = [r for r, _, _ in runs if r is not None]
    keys = sorted(
        {(p["phase"], p["step"]) for r in good for p in r["phases"]},
        key=lambda k: (k[1] if k[1] is not None else 99, PHASE_ORDER.get(k[0], 9)),
    )
    rows: list[dict[str, Any]] = []
    for phase, step in keys:
        found = [p for r in good for p in r["phases"] if (p["phase"], p["step"]) == (phase, step)]
        walls = [p["wall_s"] for p in found]
        t = phase_tokens(phase, step, tokens)
        rss = [p["peak_rss_bytes"] for p in found]
        row = {
            **base,
            "phase": phase,
            "step": step,
            "peak_allocated_bytes": median([p["peak_allocated_bytes"] for p in found]),
            "peak_reserved_bytes": median([p["peak_reserved_bytes"] for p in found]),
            "peak_device_used_bytes": median([p.get("peak_device_used_bytes") for p in found]),
            "device_total_bytes": median([p.get("device_total_bytes") for p in found]),
            "peak_rss_bytes": median(rss),
            "tokens": t,
            # a failed run's phases are cut short: their time is no rate
            "tokens_per_s": median([t / w for w in walls if w]) if t and not errors else None,
            "wall_s": median(walls),
            "wall_s_runs": [round(w, 3) for w in walls],
            # the least disturbed run, for a machine others share: a busy neighbour only ever adds time
            "wall_s_min": min(walls) if walls else None,
            "tokens_per_s_max": max(t / w for w in walls if w) if t and walls and not errors else None,
            "cpu_s": median([p.get("cpu_s") for p in found]),
            "status": "ok" if not errors else f"error: {errors[0]}",
            "error": errors[0] if errors else None,
        }
        rows.append(row)
    process = {
        **base, "phase": "process", "step": None,
        "peak_allocated_bytes": median([r.get("process_peak_allocated_bytes") for r in good]),
        "peak_reserved_bytes": median([r.get("process_peak_reserved_bytes") for r in good]),
        "peak_device_used_bytes": median([r.get("process_peak_device_used_bytes") for r in good]),
        "peak_rss_bytes": median([r.get("process_peak_rss_bytes") for r in good]),
        "wait4_maxrss_bytes": median([f.get("wait4_maxrss_bytes") for _, _, f in runs]),
        "tokens": None, "tokens_per_s": None,
        "wall_s": median([f.get("process_wall_s") for _, _, f in runs]),
        "wall_s_runs": [round(f.get("process_wall_s", 0), 3) for _, _, f in runs],
        "tokens_seen": good[0].get("tokens_seen") if good else None,
        "tokens_match": bool(good) and all(r.get("tokens_seen") == tokens[: len(r.get("tokens_seen") or [])]
                                           for r in good),
        "first_loss": [r.get("first_loss") for r in good],
        "final_loss": [r.get("final_loss") for r in good],
        "optimizer_steps": good[0].get("optimizer_steps") if good else None,
        "config": good[0].get("config") if good else None,
        "engine_peaks": good[0].get("engine_peaks") if good else None,
        "loadavg": [[r.get("loadavg_start"), r.get("loadavg_end")] for r in good],
        "cpu_allocator": sorted({r.get("cpu_allocator") for r in good if r.get("cpu_allocator")}),
        "status": "ok" if not errors else f"error: {errors[0]}",
        "error": errors[0] if errors else None,
    }  # fmt: skip
    if good and good[0].get("trl_version"):
        process["trl_version"] = good[0]["trl_version"]
        for row in rows:
            row["trl_version"] = good[0]["trl_version"]
    if errors:
        tb = next((r.get("traceback") for r in good if r.get("traceback")), None)
        process["traceback_tail"] = tb[-1500:] if tb else None
    return [*rows, process]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of (system, shape) pairs not run now are kept: slices of a GPU pass add up to one file."""
    fresh = {(r["system"], r.get("shape")) for r in new}
    return [r for r in old if (r["system"], r.get("shape")) not in fresh] + new


# What a file written before rows named their invocation said at its top: the last invocation's particulars,
# which need not be those of every row in it (a later slice rewrote them).
UNTAGGED = "before-invocation-records"
INVOCATION_KEYS = ("commit", "uncommitted_changes", "python", "repeats", "loadavg_start", "loadavg_end", "versions")


def invocations_of(old: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """An earlier file's rows, each naming its invocation, and those invocations. Rows of a file from before
    invocations were recorded are named UNTAGGED, whose record is that file's header, marked as such."""
    rows = [dict(r) for r in old.get("rows", []) if isinstance(r, dict)]
    invocations = dict(old.get("invocations") or {})
    if any("invocation" not in r for r in rows):
        invocations[UNTAGGED] = {
            **{k: old.get(k) for k in INVOCATION_KEYS if k in old},
            "host": old.get("host"),
            "note": "the header of this file before rows named their invocation: it describes the last invocation "
            "that wrote the file, not necessarily the one of each row (wall_s_runs gives a row's run count)",
        }
        for r in rows:
            r.setdefault("invocation", UNTAGGED)
    return rows, invocations


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"{'system':15} {'shape':15} {'phase':10} {'step':>4} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'RSS GiB':>8} "
          f"{'alloc GiB':>9} {'status'}")  # fmt: skip
    for r in rows:
        print(
            f"{r['system']:15} {r.get('shape', ''):15} {r['phase']:10} {f(r.get('step'), 'd'):>4} "
            f"{f(r['wall_s'], '.1f'):>8} {f(r.get('cpu_s'), '.1f'):>8} {f(r['tokens_per_s'], '.0f'):>8} "
            f"{f(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**30, '.2f'):>8} "
            f"{f(r['peak_allocated_bytes'] and r['peak_allocated_bytes'] / 2**30, '.2f'):>9} {r['status'][:60]}"
        )


class Report:
    """The result JSON, rewritten (atomically) after every worker. Rows of (system, shape) pairs not run now
    are kept from an earlier file of the same device: the slices of a GPU pass add up to one file. Each row
    names the invocation that measured it, and `invocations` holds what each one ran (commit, repeats, host,
    load): a file that several invocations wrote says which figures came from which."""

    def __init__(
        self, out: Path, args: argparse.Namespace, commit: str | None, changes: list[str] | None
    ) -> None:
        self.out = out
        self.args = args
        self.old: dict[str, Any] = {}
        if out.is_file():
            with contextlib.suppress(ValueError):
                self.old = json.loads(out.read_text())
        self.by_shape: dict[str, list[dict[str, Any]]] = {}
        self.shapes: dict[str, Any] = {}
        started = datetime.now(timezone.utc)
        base = f"{started:%Y-%m-%dT%H:%M:%SZ}-{(commit or 'nocommit')[:7]}"
        self.invocation, taken, n = base, set(self.old.get("invocations") or {}), 1
        while self.invocation in taken:  # two invocations in one second: each keeps its own record
            n += 1
            self.invocation = f"{base}-{n}"
        self.meta: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "commit": commit,
            "uncommitted_changes": changes,
            "python": args.python,
            "systems": list(args.systems),
            "repeats": args.repeats,
            "cpu_allocator": getattr(args, "cpu_allocator", None),
            "loadavg_start": loadavg(),
        }

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for rows in self.by_shape.values() for r in rows]

    def add_shape(self, shape: Shape, prep: dict[str, Any]) -> None:
        self.meta |= {"device": prep["device"], "versions": prep["versions"]}
        self.shapes[shape.name] = {
            **asdict(shape),
            "tokens_per_step": [s["tokens"] for s in prep["steps"]],
            "longest": [s["longest"] for s in prep["steps"]],
            "model_build_s": round(prep["model_seconds"], 1),
        }

    def set_rows(self, shape: Shape, rows: list[dict[str, Any]]) -> None:
        self.by_shape[shape.name] = rows
        self.write()

    def finish(self) -> None:
        self.write()

    def write(self) -> None:
        versions = self.meta.get("versions", {})
        device = self.meta.get("device", self.args.device)
        host = host_record()
        rows = [{**r, "invocation": self.invocation} for r in self.rows]
        shapes, invocations = dict(self.shapes), {}
        if self.old.get("device") == device and isinstance(self.old.get("rows"), list):
            old_rows, invocations = invocations_of(self.old)
            rows = merge_rows(old_rows, rows)
            shapes = {**self.old.get("settings", {}).get("shapes", {}), **shapes}
        invocations[self.invocation] = {
            **{k: v for k, v in self.meta.items() if k != "device"},
            "loadavg_end": loadavg(),
            "host": host,
        }
        named = {r.get("invocation") for r in rows}
        data = {
            "device": device,
            "torch": versions.get("torch"),
            "host": host,
            "commit": self.meta["commit"],  # the latest invocation's (issue 7's schema); each row names its own
            "latest_invocation": self.invocation,
            "invocations": {k: v for k, v in invocations.items() if k in named or k == self.invocation},
            "settings": {
                "lora": LORA, "beta": BETA, "learning_rate": LEARNING_RATE, "warmup_ratio": WARMUP_RATIO,
                "max_grad_norm": MAX_GRAD_NORM, "seed": SEED, "epochs": 1, "shapes": shapes,
            },
            "tokens_rule": "T = non-pad prompt+answer tokens of chosen and rejected of every pair of a step, "
            "once per pass; tokens_per_s = T / wall_s (reference, train, step rows; total: T1 + T2)",
            "rows": rows,
        }  # fmt: skip
        write_json_atomic(self.out, data)
