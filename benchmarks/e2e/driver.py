"""The parent process: for each shape, prepares the model and data in a worker, then runs every system --repeats
times (interleaved), each run in a process of its own, and rewrites the report after every one."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import git_commit, loadavg, source_changes

from .report import Report, print_table, system_rows
from .settings import TRL_SYSTEMS, Shape
from .spawn import SCRIPT, spawn, trl_missing


def print_plan(args: argparse.Namespace, shapes: list[Shape], out: Path, cache: Path) -> None:
    """--dry-run: what would run."""
    print(f"device {args.device}; out {out}; model cache {cache}; repeats {args.repeats}; python {args.python}")
    for s in shapes:
        print(f"shape {s.name}: {s.model} (vocab {s.vocab}, hidden {s.hidden}, {s.layers} layers, heads "
              f"{s.heads}/{s.kv_heads}, intermediate {s.intermediate}); {s.pairs} pairs x 2 steps of "
              f"{s.seq_len} tokens, batch {s.batch} x {s.accum}")  # fmt: skip
        for system in args.systems:
            print(f"  {system}: {args.python} {SCRIPT.name} --worker {system} ...")


def allocator_env(choice: str, device: str) -> dict[str, str]:
    """What every worker of a CPU run starts with: the malloc `lowmem-sdpo run --cpu-allocator CHOICE` would
    restart itself on (runtime/cpu_allocator.py), for ours and TRL alike, so both run on the same allocator."""
    if device != "cpu":
        return {}
    from lowmem_sdpo.runtime.cpu_allocator import plan_allocator, preload_environment

    plan = plan_allocator(choice)
    if plan.preload is None:
        return {}
    env = preload_environment(plan, os.environ)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}  # what the preload adds or changes


def run_shapes(args: argparse.Namespace, shapes: list[Shape], out: Path, cache: Path, timeout: float) -> None:
    """Every shape x system x repeat; the report at `out` holds every run finished so far."""
    skip_trl = trl_missing(args.python) if TRL_SYSTEMS & set(args.systems) else None
    extra_env = allocator_env(args.cpu_allocator, args.device)
    report = Report(out, args, commit=git_commit(), changes=source_changes())  # before the run: what ran
    with tempfile.TemporaryDirectory(prefix="bench_e2e.") as tmp:
        work = Path(tmp)
        for shape in shapes:
            spec = {"shape": asdict(shape), "device": args.device, "cache": str(cache),
                    "data_dir": str(work / f"data-{shape.name}")}  # fmt: skip
            prep, tail, _ = spawn(args.python, "prepare", spec, work, timeout, None)
            if prep is None:
                print(tail, file=sys.stderr)
                raise SystemExit(f"preparing shape {shape.name} failed")
            tokens = [s["tokens"] for s in prep["steps"]]
            for s in prep["steps"]:
                if s["truncated"] or s["dropped"] or s["pairs"] != shape.pairs:
                    raise SystemExit(f"shape {shape.name}: the generated data was cut or dropped: {s}")
            spec = {**spec, "model_dir": prep["model_dir"], "data": prep["data"]}
            report.add_shape(shape, prep)
            runs: dict[str, list[Any]] = {s: [] for s in args.systems}

            def flush(
                shape: Shape = shape, runs: dict[str, list[Any]] = runs, tokens: list[int] = tokens
            ) -> None:
                rows = []
                for system in args.systems:
                    skip = skip_trl if system in TRL_SYSTEMS else None
                    if runs[system] or skip:
                        rows += system_rows(system, shape, runs[system], tokens, skip)
                report.set_rows(shape, rows)

            flush()
            for rep in range(args.repeats):  # systems one after another, repetitions interleaved
                for system in args.systems:
                    if system in TRL_SYSTEMS and skip_trl:
                        continue
                    profile = None
                    if args.profile_dir:
                        profile = str(Path(args.profile_dir).resolve() / f"{system}-{shape.name}-{rep}.prof")
                    print(f"[{time.strftime('%H:%M:%S')}] {shape.name} {system} run {rep + 1}/{args.repeats} "
                          f"(load {loadavg()})", flush=True)  # fmt: skip
                    result, tail, figures = spawn(args.python, system, spec, work, timeout, profile, extra_env)
                    if result is None or result.get("error"):
                        print(f"  failed: {(result or {}).get('error') or tail[-500:]}", flush=True)
                    runs[system].append((result, tail, figures))
                    flush()  # a command killed by its time limit still leaves the systems it finished
    report.finish()
    print_table(report.rows)
    print(f"wrote {out}")
