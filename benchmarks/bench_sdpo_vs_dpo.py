"""sDPO against one-shot DPO on the same data, scored on held-out pairs: the paper's claim in miniature (issue 18).

Arms, on the carry toy (lowmem_sdpo.data.carry_task) with S = the `tiny-carry` model:
  S          the model before any preference training;
  sdpo       two sDPO steps: D_1 (two-digit sums whose units do not carry), then D_2 (those that do), the
             reference of step 2 being M_1;
  dpo        one DPO step on D_1 + D_2 together, reference S;
  sdpo_base  two steps as sdpo, but step 2's LoRA starts from S (--target-init base: the paper's Figure 3
             ablation), with M_1 still the reference.
Every trained arm sees the same pairs the same number of times with the same settings (BENCH_SETTINGS) and
takes the same number of optimiser steps (each sDPO step half of DPO's). Each seed changes the LoRA init and
the data order (the engine's --seed); S and the pairs stay fixed, so the spread is the training's own.

Scoring (lowmem_sdpo.toy.score, on the evaluation module's figures): preference accuracy, implicit-reward accuracy
against S, greedy exact match and gamma on the scored split, plus each step's first loss. `--split validation` is where BENCH_SETTINGS were
chosen; `--split heldout` (the default) is scored once per configuration and never used for a choice.

    python benchmarks/bench_sdpo_vs_dpo.py --split validation --seeds 0 1      # choosing settings
    python benchmarks/bench_sdpo_vs_dpo.py --seeds 0 1 2 3 4 5 6 7 --jobs 2      # the reported run
    python benchmarks/bench_sdpo_vs_dpo.py --smoke --out /tmp/s.json            # CI: `tiny`, a few pairs, ~15 s

JSON (benchmarks/results/bench_sdpo_vs_dpo[_validation|_smoke].json): {"split", "model", "settings", "rejected", "data",
"seeds", "arms": {arm: {"mean": {metric}, "sd": {metric}, "per_seed": [row]}}, "differences": {"a - b":
{metric: {"mean", "sd", "a_ahead_in"}}}, "device", "torch", "commit", "wall_seconds"}; a row holds seed,
the metrics, first_losses (per step), optimizer_steps, wall_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import git_commit, host_record, write_json_atomic

from lowmem_sdpo.toy.run_settings import TINY_TOY_RUN

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ARMS = ("S", "sdpo", "dpo", "sdpo_base")
METRICS = ("preference_accuracy", "reward_accuracy", "exact_match", "gamma")
# Chosen on the validation split (see benchmarks/README.md, "bench_sdpo_vs_dpo.py"), then frozen.
BENCH_SETTINGS: dict[str, Any] = {
    **TINY_TOY_RUN,
    "beta": 0.5,
    "learning_rate": 3e-4,
    "epochs": 1.0,
    "batch_size": 16,
    "save_every": 1000,
}
# Smoke: the CI-cheap `tiny` model (the carry toy's S takes a minute to build), a few pairs of each split.
SMOKE_SIZES = {"step1": 32, "step2": 32, "scored": 24}


def _data(
    work: Path, split: str, smoke: bool
) -> tuple[dict[str, Path], list[dict[str, str]], dict[str, int]]:
    """Step files (step1, step2, union) and the scored pairs."""
    from lowmem_sdpo.data import carry_task as task

    splits = task.split_problems(task.SPLIT_SEED, **task.SPLIT_SIZES)
    step1, step2, scored = splits.step1, splits.step2, getattr(splits, split)
    if smoke:
        step1, step2 = step1[: SMOKE_SIZES["step1"]], step2[: SMOKE_SIZES["step2"]]
        scored = scored[: SMOKE_SIZES["scored"]]
    rows1 = task.pairs(step1, task.SPLIT_SEED, "step1")
    rows2 = task.pairs(step2, task.SPLIT_SEED, "step2")
    files = {
        "step1": task.write_jsonl(work / "data" / "d1_no_carry.jsonl", rows1),
        "step2": task.write_jsonl(work / "data" / "d2_carry.jsonl", rows2),
        # The engine shuffles each epoch (seeded), so the union's file order does not matter.
        "union": task.write_jsonl(work / "data" / "d1_d2_union.jsonl", rows1 + rows2),
    }
    sizes = {"step1_pairs": len(rows1), "step2_pairs": len(rows2), "scored_pairs": len(scored)}
    return files, task.pairs(scored, task.SPLIT_SEED, split), sizes


def _own_mistake_files(work: Path, files: dict[str, Path], model_dir: Path) -> dict[str, Path]:
    """--rejected own: each step pair's rejected answer becomes S's own greedy answer where that is wrong."""
    from lowmem_sdpo.data import carry_task as task
    from lowmem_sdpo.toy.score import ToyScorer

    out: dict[str, list[dict[str, str]]] = {}
    for step in ("step1", "step2"):
        rows = [json.loads(line) for line in files[step].read_text().splitlines()]
        scorer = ToyScorer(model_dir, rows)
        try:
            out[step] = task.with_own_mistakes(rows, scorer.greedy([]))
        finally:
            scorer.release()
    return {
        "step1": task.write_jsonl(work / "data" / "d1_no_carry_own.jsonl", out["step1"]),
        "step2": task.write_jsonl(work / "data" / "d2_carry_own.jsonl", out["step2"]),
        "union": task.write_jsonl(work / "data" / "d1_d2_union_own.jsonl", out["step1"] + out["step2"]),
    }


def _arm_config(
    arm: str, files: dict[str, Path], model: str, out: Path, seed: int, settings: dict[str, Any]
) -> Any:
    from lowmem_sdpo.engine import RunConfig

    steps = f"{files['union']}" if arm == "dpo" else f"{files['step1']},{files['step2']}"
    target_init = "base" if arm == "sdpo_base" else "previous"
    return RunConfig(
        model=model,
        steps=steps,
        output_dir=str(out),
        seed=seed,
        target_init=target_init,
        quiet=True,
        **settings,
    )


def run_seed(
    seed: int, split: str, smoke: bool, model: str, settings: dict[str, Any], rejected: str = "slips"
) -> list[dict[str, Any]]:
    """Every arm for one seed: train, then score the final model. One process per seed (see --jobs)."""
    import torch

    torch.set_num_threads(1)  # the runs are tiny; threads only contend with the other jobs
    from lowmem_sdpo.engine import run_sdpo
    from lowmem_sdpo.eval.runmodels import finished_chains
    from lowmem_sdpo.models import resolve_model
    from lowmem_sdpo.toy.score import ToyScorer

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f"bench_sdpo_vs_dpo.{seed}.") as tmp:
        work = Path(tmp)
        files, scored, _ = _data(work, split, smoke)
        if rejected == "own":
            files = _own_mistake_files(work, files, resolve_model(model))
        scorer = ToyScorer(resolve_model(model), scored)
        try:
            rows.append(
                {"arm": "S", "seed": seed, **scorer.score([]), "first_losses": [], "optimizer_steps": 0}
            )
            for arm in ARMS[1:]:
                started = time.perf_counter()
                out = work / arm
                summaries = run_sdpo(_arm_config(arm, files, model, out, seed, settings))
                chain = finished_chains(out)[len(summaries)]  # M_T, read back as `eval` reads a run
                rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        **scorer.score(chain),
                        "first_losses": [s["first_loss"] for s in summaries],
                        "optimizer_steps": sum(s["optimizer_steps"] for s in summaries),
                        "wall_seconds": round(time.perf_counter() - started, 1),
                    }
                )
                print(f"seed {seed} {arm}: " + ", ".join(f"{k} {rows[-1][k]}" for k in METRICS), flush=True)
        finally:
            scorer.release()
    return rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per arm: mean and sd over seeds of every metric. Per pair of arms: the per-seed difference's mean, sd and
    in how many seeds the first arm was strictly ahead."""
    arms: dict[str, Any] = {}
    for arm in ARMS:
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        stats = {m: _mean_sd([r[m] for r in mine]) for m in METRICS if mine and mine[0][m] is not None}
        arms[arm] = {
            "mean": {m: v[0] for m, v in stats.items()},
            "sd": {m: v[1] for m, v in stats.items()},
            "per_seed": mine,
        }
    differences: dict[str, Any] = {}
    for a, b in (("sdpo", "dpo"), ("sdpo", "sdpo_base"), ("dpo", "S"), ("sdpo", "S")):
        by_seed = {r["seed"]: r for r in arms[b]["per_seed"]}
        pairs = [(r, by_seed[r["seed"]]) for r in arms[a]["per_seed"] if r["seed"] in by_seed]
        diff: dict[str, Any] = {}
        for m in ("preference_accuracy", "exact_match", "gamma"):
            deltas = [x[m] - y[m] for x, y in pairs]
            mean, sd = _mean_sd(deltas)
            diff[m] = {"mean": mean, "sd": sd, "a_ahead_in": sum(d > 0 for d in deltas), "seeds": len(deltas)}
        differences[f"{a} - {b}"] = diff
    return arms, differences


ARM_NAMES = {
    "S": "S",
    "sdpo": "sDPO (2 steps)",
    "dpo": "DPO (D_1 + D_2 at once)",
    "sdpo_base": "sDPO, base init",
}


def markdown_table(result: dict[str, Any]) -> str:
    """The README's table: mean +- sd over seeds per arm, and each arm's per-seed preference accuracy."""
    arms = result["arms"]
    lines = [
        "| model | preference accuracy | reward accuracy vs S | greedy exact match | gamma | first loss per step "
        "| preference accuracy per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        mean, sd, rows = arms[arm]["mean"], arms[arm]["sd"], arms[arm]["per_seed"]
        cells = [f"{mean[m]:.3f} ± {sd[m]:.3f}" if m in mean else "—" for m in METRICS]
        steps = len(rows[0]["first_losses"]) if rows else 0
        first = (
            " / ".join(f"{statistics.fmean(r['first_losses'][t] for r in rows):.3f}" for t in range(steps))
            or "—"
        )
        seeds = " ".join(f"{r['preference_accuracy']:.3f}" for r in rows)
        lines.append(f"| {ARM_NAMES[arm]} | {' | '.join(cells)} | {first} | {seeds} |")
    lines.append("")
    for pair, diff in result["differences"].items():
        d = diff["preference_accuracy"]
        lines.append(
            f"- {pair}, preference accuracy: {d['mean']:+.3f} ± {d['sd']:.3f} (first ahead in {d['a_ahead_in']} of "
            f"{d['seeds']} seeds)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", choices=("heldout", "validation"), default="heldout")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0-7 (smoke: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel, one process each")
    parser.add_argument("--smoke", action="store_true", help="`tiny` on a few pairs, one seed: a CI check")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--rejected", choices=("slips", "own"), default="slips",
        help="the steps' rejected answers: uniform one-digit slips, or S's own wrong greedy answers where it has "
        "one (the scored pairs keep the slips either way)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a BENCH_SETTINGS entry (for the validation sweep only; recorded in the JSON)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    settings = dict(BENCH_SETTINGS)
    for item in args.set:
        key, value = item.split("=", 1)
        settings[key] = type(BENCH_SETTINGS[key])(value)
    if args.smoke:
        settings |= {"epochs": 1.0, "batch_size": 8}
    args.seeds = args.seeds or ([0] if args.smoke else list(range(8)))
    model = "tiny" if args.smoke else "tiny-carry"
    suffix = "_smoke" if args.smoke else ("_validation" if args.split == "validation" else "")
    out = args.out or RESULTS / f"bench_sdpo_vs_dpo{suffix}.json"

    from lowmem_sdpo.models import resolve_model

    resolve_model(model)  # built once here, not by every job at the same time
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    commit = git_commit()  # at the start: the code that ran, whatever is committed while it runs
    rows: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(run_seed, s, args.split, args.smoke, model, settings, args.rejected)
                for s in args.seeds
            ]
            for f in futures:
                rows += f.result()
    else:
        for s in args.seeds:
            rows += run_seed(s, args.split, args.smoke, model, settings, args.rejected)
    arms, differences = summarise(rows)
    with tempfile.TemporaryDirectory() as tmp:
        _, _, sizes = _data(Path(tmp), args.split, args.smoke)
    import torch

    result = {
        "split": args.split,
        "model": model,
        "settings": settings,
        "rejected": args.rejected,
        "data": sizes,
        "seeds": args.seeds,
        "arms": arms,
        "differences": differences,
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores; load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {args.jobs} job(s), 1 torch thread each)",
        "torch": torch.__version__,
        "host": host_record(),
        "commit": commit,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out, result)
    for arm in ARMS:
        mean, sd = arms[arm]["mean"], arms[arm]["sd"]
        print(f"{arm:10s} " + "  ".join(f"{m} {mean[m]:.3f}±{sd[m]:.3f}" for m in mean))
    print(markdown_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
