"""`lowmem-sdpo plan`: predict a run's peak GPU memory per phase from the model's config alone (no weights are
read), say whether it fits --gpu-memory and which flags make it fit; with --steps and --tflops, time per step."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowmem_sdpo.checks import check_number
from lowmem_sdpo.engine.config import CHOICES, RunConfig
from lowmem_sdpo.errors import InputError

DEFAULT_GPU_MEMORY = "24GiB"
# What `run`'s `auto` choices mean on a CUDA card with bf16 (sm80+) and bitsandbytes installed.
AUTO: dict[str, str] = {"optim": "adamw_8bit", "compute_dtype": "bfloat16"}


def register(subparsers: Any) -> None:
    run = RunConfig()
    plan = subparsers.add_parser(
        "plan", help="predict peak GPU memory per phase (and time per step) before a run", description=__doc__
    )
    plan.add_argument(
        "--model", required=True, help="hub id (only config.json is fetched), local directory or alias"
    )
    plan.add_argument("--revision", default=None, help="hub branch, tag or commit of --model")
    plan.add_argument("--max-length", type=int, required=True, help="tokens per sequence, prompt + answer")
    plan.add_argument(
        "--batch-size",
        type=int,
        default=run.batch_size,
        help=f"pairs per micro-batch (default {run.batch_size})",
    )
    plan.add_argument("--lora-r", type=int, default=run.lora_r, help=f"LoRA rank (default {run.lora_r})")
    plan.add_argument(
        "--grad-accum",
        type=int,
        default=run.grad_accum,
        help=f"micro-batches per optimiser step (default {run.grad_accum})",
    )
    plan.add_argument(
        "--reference-batch-size",
        type=int,
        default=run.reference_batch_size,
        help="pairs per reference forward (default 0: 2 x --batch-size, as run does)",
    )
    plan.add_argument(
        "--steps",
        default=None,
        help="pairs per sDPO step, comma-separated integers (the paper's OpenOrca + UltraFeedback: 12859,60829); "
        "sets the number of steps (default: 2) and, with --tflops, the time per step",
    )
    plan.add_argument(
        "--gpu-memory",
        default=DEFAULT_GPU_MEMORY,
        help=f"the card's memory, e.g. 24GiB, 16GB, 12000MiB (default {DEFAULT_GPU_MEMORY})",
    )
    plan.add_argument(
        "--tflops", type=float, default=None, help="sustained TFLOP/s of the card for the time estimate"
    )
    plan.add_argument(
        "--tokens-per-pair",
        type=int,
        default=None,
        help="mean tokens of a pair, chosen + rejected, for the time estimate (default: --max-length)",
    )
    plan.add_argument(
        "--optim", default="auto", choices=CHOICES["optim"], help="as for run (auto: adamw_8bit on CUDA)"
    )
    plan.add_argument(
        "--compute-dtype",
        default="auto",
        choices=CHOICES["compute_dtype"],
        help="as for run (auto: bfloat16, an sm80+ card)",
    )
    plan.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=run.gradient_checkpointing
    )
    plan.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=run.double_quant)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=plan_command)


def parse_steps(text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    items = [item.strip().replace("_", "") for item in text.split(",")]
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        raise InputError(
            f"--steps {text!r}: expected pairs per step as comma-separated positive integers, e.g. 12859,60829"
        )
    return tuple(int(item) for item in items)


def plan_command(args: argparse.Namespace) -> int:
    from lowmem_sdpo.plan import PlanSettings, make_plan, parse_size

    gpu_memory = parse_size(args.gpu_memory, "--gpu-memory")  # before any model is read: bad input fails fast
    if args.tflops is not None:
        check_number("--tflops", args.tflops, low=0, low_open=True)
    if args.tokens_per_pair is not None:
        check_number("--tokens-per-pair", args.tokens_per_pair, low=1, integer=True)
    settings = PlanSettings(
        max_length=args.max_length,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        grad_accum=args.grad_accum,
        pairs_per_step=parse_steps(args.steps),
        optim=AUTO["optim"] if args.optim == "auto" else args.optim,
        gradient_checkpointing=args.gradient_checkpointing,
        double_quant=args.double_quant,
        compute_dtype=AUTO["compute_dtype"] if args.compute_dtype == "auto" else args.compute_dtype,
        reference_batch_size=args.reference_batch_size,
    )
    plan = make_plan(
        args.model,
        settings,
        gpu_memory=gpu_memory,
        tflops=args.tflops,
        tokens_per_pair=args.tokens_per_pair,
        revision=args.revision,
    )
    if args.json:
        json.dump(plan.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from lowmem_sdpo.plan.render import print_plan

    print_plan(plan)
    return 0
