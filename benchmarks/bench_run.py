"""End-to-end sDPO throughput and memory: does a model's run fit a card, and how fast does it train?

Runs `lowmem-sdpo run` (through its public API) in a temporary directory and records, per sDPO step, the
training throughput (median tokens/s over optimiser steps, the first excluded: it pays for warm-up), the peak
memory (CUDA: max allocated; CPU: max RSS), the reference-pass and total wall time, and the loss settings.
JSON goes to benchmarks/results/ shaped
  {"device", "torch", "transformers", "bitsandbytes", "commit", "model", "options", "rows": [{"step", "pairs",
   "optimizer_steps", "tokens_per_second_median", "peak_memory_bytes", "memory_kind", "wall_seconds",
   "first_loss", "final_loss"}]}

GPU (the question users ask: does SOLAR-10.7B sDPO fit 24 GB?):
  python benchmarks/bench_run.py --model solar-10.7b-instruct --steps openorca --epochs 0.01 \
      --batch-size 1 --grad-accum 16 --out benchmarks/results/bench_run_solar_h100.json
Smoke (CPU, tiny model, toy data, ~20 s):
  python benchmarks/bench_run.py --smoke
Any `lowmem-sdpo run` option can follow; --output-dir is managed here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import device_label, write_json_atomic

from lowmem_sdpo.cli.run_cmd import add_run_arguments, config_from_args
from lowmem_sdpo.engine import run_sdpo

REPO = Path(__file__).resolve().parents[1]
SMOKE_ARGS = [
    "--model", "tiny",
    "--steps", f"{REPO / 'examples/data/toy_step1.jsonl'},{REPO / 'examples/data/toy_step2.jsonl'}",
    "--max-length", "32", "--max-prompt-length", "24", "--batch-size", "8", "--grad-accum", "2",
    "--epochs", "0.2", "--learning-rate", "3e-3", "--beta", "0.5", "--lora-r", "8", "--lora-alpha", "16",
    "--device", "cpu",
]  # fmt: skip


def step_row(run_dir: Path, t: int) -> dict[str, Any]:
    step = run_dir / f"step-{t}"
    summary = json.loads((step / "summary.json").read_text())
    rows = [json.loads(line) for line in (step / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in rows[1:]] or [r["tokens_per_second"] for r in rows]
    return {
        "step": t,
        "pairs": summary["pairs_used"],
        "optimizer_steps": summary["optimizer_steps"],
        "tokens_per_second_median": statistics.median(rates) if rates else None,
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "memory_kind": summary["memory_kind"],
        "wall_seconds": summary["wall_seconds"],
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the toy data, on CPU")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/bench_run[_smoke].json)")
    argv = list(sys.argv[1:] if argv is None else argv)
    smoke = "--smoke" in argv
    args = parser.parse_args((SMOKE_ARGS if smoke else []) + argv)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"bench_run{'_smoke' if smoke else ''}.json")
    with tempfile.TemporaryDirectory(prefix="bench_run.") as tmp:
        args.output_dir = str(Path(tmp) / "run")
        args.quiet = True if args.quiet is None else args.quiet
        config = config_from_args(args)
        summaries = run_sdpo(config)
        rows = [step_row(Path(config.output_dir), s["step"]) for s in summaries]
        run_json = json.loads(
            (Path(config.output_dir) / "run.json").read_text()
        )  # versions and commit, as run
    options = {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "quiet")}
    result = {
        "device": device_label("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu"),
        "torch": torch.__version__,
        "transformers": run_json["versions"]["transformers"],
        "bitsandbytes": run_json["versions"]["bitsandbytes"],
        "host": run_json["host"],
        "commit": run_json["commit"],
        "model": config.model,
        "options": options,
        "rows": rows,
    }
    write_json_atomic(out, result)
    for r in rows:
        print(
            f"step {r['step']}: {r['pairs']} pairs, {r['optimizer_steps']} optimiser steps, "
            f"{r['tokens_per_second_median']:.0f} tokens/s, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"({r['memory_kind']}), {r['wall_seconds']:.1f} s"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
