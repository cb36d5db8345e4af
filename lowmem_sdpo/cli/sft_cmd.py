"""`lowmem-sdpo sft`: QLoRA SFT of a base model into S, exported as a bf16 checkpoint `--model` accepts.

Rows: prompt/completion, conversational (messages ending with the answer), alpaca, OpenOrca, or the chosen
side of any preference file `run` reads. `--recipe solar-10.7b-sft` builds the paper's S (see
lowmem_sdpo/sft/recipes.py for its data and sizes); `--model solar-10.7b-sft` then resolves to it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from lowmem_sdpo.checks import check_run_target
from lowmem_sdpo.cli.allocator import add_cpu_allocator_argument, restart_if_asked
from lowmem_sdpo.cli.launch import add_num_processes_argument, check_num_processes, launch_if_asked
from lowmem_sdpo.data.spec import parse_steps
from lowmem_sdpo.engine.config import RunConfig, validate
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.sft.settings import DATA_FIELD, NOT_SFT, SFT_DEFAULTS, check_sft_config


def register(subparsers: Any) -> None:
    from lowmem_sdpo.cli.run_cmd import add_run_arguments
    from lowmem_sdpo.sft.recipes import SFT_RECIPES

    sft = subparsers.add_parser(
        "sft", help="QLoRA SFT of a base model into S (the paper's starting point)", description=__doc__
    )
    # no flag for an option sft does not use (sft/settings.py): argparse refuses one in a line, exit 2
    add_run_arguments(sft, skip=(*NOT_SFT, DATA_FIELD), defaults=SFT_DEFAULTS, with_loss=False)
    sft.add_argument(
        "--data", help="comma-separated SFT data items: local files, dataset directories, hub ids[:split]"
    )
    sft.add_argument(
        "--recipe", choices=sorted(SFT_RECIPES), help="a documented recipe (model, data, sizes, settings)"
    )
    sft.add_argument("--export-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    sft.add_argument("--resume", action="store_true", help="continue the SFT run in --output-dir")
    add_num_processes_argument(sft)
    add_cpu_allocator_argument(sft)
    sft.set_defaults(handler=sft_command)


def sft_config(args: argparse.Namespace) -> tuple[RunConfig, dict[str, int]]:
    """recipe (if any) < flags; SFT_DEFAULTS under both."""
    from lowmem_sdpo.engine.config import default_prompt_length
    from lowmem_sdpo.sft.recipes import SFT_RECIPES

    values: dict[str, Any] = {}
    limits: dict[str, int] = {}
    if args.recipe:
        recipe = SFT_RECIPES[args.recipe]
        values |= {
            "model": recipe.model,
            "steps": recipe.data,
            "output_dir": recipe.output_dir,
            **recipe.settings,
        }
        limits = dict(recipe.limits)
    flags = {
        f.name: getattr(args, f.name, None) for f in fields(RunConfig) if f.name not in (*NOT_SFT, DATA_FIELD)
    }
    values |= {k: v for k, v in flags.items() if v is not None}
    prompt_length = default_prompt_length(values.get("max_length"), SFT_DEFAULTS.max_prompt_length)
    if "max_prompt_length" not in values and prompt_length is not None:
        values["max_prompt_length"] = prompt_length
    if args.data:
        values["steps"] = args.data
        limits = {}
    if not values.get("steps"):
        raise InputError("--data is required (SFT rows), or --recipe")
    if not values.get("output_dir"):
        raise InputError("--output-dir is required (the SFT run directory; S is written to OUTPUT_DIR/model)")
    config = replace(SFT_DEFAULTS, **values)
    validate(config)
    check_sft_config(config)
    parse_steps(config.steps, "--data")  # each item's grammar, and a named local file exists
    check_run_target("--output-dir", Path(config.output_dir))
    return config, limits


def sft_command(args: argparse.Namespace) -> int:
    check_num_processes(args.num_processes)
    config, limits = sft_config(args)  # every flag checked before torch is imported
    if config.report_to != "none":
        from lowmem_sdpo.trackers import check_tracker

        check_tracker(config.report_to)  # a missing package is refused before anything runs
    restart_if_asked(args, config.device)  # a CPU run under tcmalloc where installed: before anything loads
    launched = launch_if_asked(args)
    if launched is not None:
        return launched

    from lowmem_sdpo.runtime.failures import TrainingStopped
    from lowmem_sdpo.sft.train import run_sft

    try:
        run_sft(config, resume=args.resume, limits=limits, export_dtype=args.export_dtype)
    except TrainingStopped as err:  # NaN 3, out of memory 4, SIGINT / SIGTERM 130: as `run`
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
