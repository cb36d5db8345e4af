"""`lowmem-sdpo self-reward`: self-rewarding sDPO (Yuan et al. 2024). Per iteration t: M_{t-1} samples
candidates, the judge scores each with the additive 5-point rubric (3 judgements averaged), the highest
against the lowest score makes D_t, and D_t is trained as sDPO step t with M_{t-1} as the reference.
Defaults are the paper's: 4 candidates at temperature 0.7 / top-p 0.9, 3 judgements, DPO beta 0.1,
learning rate 1e-6, effective batch 16. Every phase resumes after a kill (--resume).
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any

from lowmem_sdpo.cli.allocator import add_cpu_allocator_argument, restart_if_asked
from lowmem_sdpo.engine.config import RunConfig

# Training options self-reward sets itself (the steps are the iterations' D_t, the model is --model).
NOT_HERE = ("steps", "output_dir", "model", "columns", "desirable_threshold", "diagnostics", "quiet")
# The paper's DPO settings (beta 0.1, lr 1e-6, batch 16 = 4 x 4); the rest as `run`.
TRAIN_DEFAULTS = replace(RunConfig(), learning_rate=1e-6, beta=0.1, batch_size=4, grad_accum=4)


def register(subparsers: Any) -> None:
    from lowmem_sdpo.cli.run_cmd import add_run_arguments
    from lowmem_sdpo.selfreward.settings import SelfRewardSettings

    d = SelfRewardSettings(model="", prompts="", output_dir="")
    sr = subparsers.add_parser(
        "self-reward", help="self-rewarding sDPO: generate, judge, pair, train", description=__doc__
    )
    sr.add_argument(
        "--model", required=True, help="S: hub id, local directory or alias (e.g. an `sft` output)"
    )
    sr.add_argument(
        "--prompts", required=True, help="JSON Lines with a 'prompt' per row, or .txt, one per line"
    )
    sr.add_argument("--output-dir", required=True, help="the self-reward run directory")
    sr.add_argument("--iterations", type=int, default=d.iterations, help=f"K (default {d.iterations})")
    sr.add_argument(
        "--candidates", type=int, default=d.candidates, help=f"answers per prompt (default {d.candidates})"
    )
    sr.add_argument("--judge", default=d.judge, help="self | MODEL | python:module:function (default self)")
    sr.add_argument(
        "--judge-samples",
        type=int,
        default=d.judge_samples,
        help=f"judgements averaged per candidate (default {d.judge_samples})",
    )
    sr.add_argument(
        "--judge-prompt",
        help="the rubric, with {prompt} and {response} placeholders (default: the bundled one)",
    )
    sr.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help=f"candidate sampling (default {d.temperature})",
    )
    sr.add_argument("--top-p", type=float, default=d.top_p, help=f"(default {d.top_p})")
    sr.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"per candidate (default {d.max_new_tokens})",
    )
    sr.add_argument(
        "--judge-temperature",
        type=float,
        default=d.judge_temperature,
        help=f"(default {d.judge_temperature})",
    )
    sr.add_argument(
        "--judge-max-new-tokens",
        type=int,
        default=d.judge_max_new_tokens,
        help=f"per judgement; the score comes last (default {d.judge_max_new_tokens})",
    )
    sr.add_argument(
        "--gen-batch-size",
        type=int,
        default=d.batch_size,
        help=f"prompts per generate call (default {d.batch_size})",
    )
    sr.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    sr.add_argument("--quiet", action="store_true")
    add_run_arguments(sr, skip=NOT_HERE, defaults=TRAIN_DEFAULTS, with_config=False)
    add_cpu_allocator_argument(sr)
    sr.set_defaults(handler=selfreward_command)


def train_config(args: argparse.Namespace) -> RunConfig:
    from lowmem_sdpo.engine.config import default_prompt_length
    from lowmem_sdpo.losses import loss_options_from_args

    flags = {f.name: getattr(args, f.name, None) for f in fields(RunConfig) if f.name not in NOT_HERE}
    loss = args.loss or TRAIN_DEFAULTS.loss
    flags |= {"loss": loss, "loss_options": loss_options_from_args(loss, args)}
    if flags["max_prompt_length"] is None:
        flags["max_prompt_length"] = default_prompt_length(flags["max_length"], TRAIN_DEFAULTS.max_prompt_length)
    return replace(TRAIN_DEFAULTS, quiet=args.quiet, **{k: v for k, v in flags.items() if v is not None})


def selfreward_command(args: argparse.Namespace) -> int:
    from lowmem_sdpo.runtime.failures import TrainingStopped
    from lowmem_sdpo.runtime.reporting import Reporter
    from lowmem_sdpo.selfreward.loop import SelfRewardRun, SelfRewardSettings

    # A CPU run under tcmalloc where installed; the restarted process checks the input (and resumes) as this one would.
    train = train_config(args)
    restart_if_asked(args, train.device)
    settings = SelfRewardSettings(
        model=args.model, prompts=args.prompts, output_dir=args.output_dir, iterations=args.iterations,
        candidates=args.candidates, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, judge=args.judge, judge_samples=args.judge_samples,
        judge_prompt=args.judge_prompt, judge_temperature=args.judge_temperature,
        judge_max_new_tokens=args.judge_max_new_tokens, batch_size=args.gen_batch_size, seed=args.seed or 0,
        quiet=args.quiet,
    )  # fmt: skip
    try:
        SelfRewardRun(settings, train, Reporter(args.quiet)).run(resume=args.resume)
    except TrainingStopped as err:
        print(f"error: {err}")
        return err.exit_code
    return 0
