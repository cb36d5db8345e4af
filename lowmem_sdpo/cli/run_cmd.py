"""`lowmem-sdpo run`: train sDPO steps D_1..D_T into a run directory."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from lowmem_sdpo.cli.allocator import add_cpu_allocator_argument, restart_if_asked
from lowmem_sdpo.cli.launch import add_num_processes_argument, check_num_processes, launch_if_asked
from lowmem_sdpo.data.spec import parse_steps
from lowmem_sdpo.engine.config import RunConfig, build_config, default_prompt_length, read_config_file
from lowmem_sdpo.engine.rundir.resume import check_run_dir
from lowmem_sdpo.losses import add_loss_arguments, loss_options_from_args

HELP: dict[str, str] = {
    "model": (
        "hub id, local HF directory, or alias: solar-10.7b (base), solar-10.7b-instruct (SFT + DPO on the "
        "paper's data), tiny, smollm2-135m-instruct-q4 (a real 135M chat model, built offline from a PyPI wheel); "
        "solar-10.7b-sft (the paper's S: the output of `lowmem-sdpo sft --recipe solar-10.7b-sft`)"
    ),
    "steps": "comma-separated step items: aliases (openorca, ultrafeedback, ...), hub ids[:split], local files",
    "output_dir": "run directory (run.json, step-t/...); default runs/<model>-<steps>",
    "columns": "map your columns: prompt=question,chosen=good,rejected=bad",
    "desirable_threshold": "HelpSteer: helpfulness >= this is desirable",
    "seed": "seed for splits, data order, LoRA init and dropout",
    "max_length": "tokens per sequence, prompt + answer",
    "max_prompt_length": "prompt tokens (cut from the left); unless given, at most half of --max-length",
    "beta": "the KL strength beta of the objective",
    "learning_rate": "peak learning rate",
    "epochs": "passes over each step's data (fractions allowed)",
    "batch_size": "pairs per micro-batch (chosen and rejected go through one forward)",
    "grad_accum": "micro-batches per optimiser step",
    "reference_batch_size": (
        "pairs per forward of the no-grad reference pass, batched by length so rows pad little; "
        "0: auto, 2 x --batch-size"
    ),
    "warmup_ratio": "fraction of optimiser steps of linear warm-up before the cosine decay",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "optim": (
        "auto (adamw_8bit on CUDA, adamw_fused there without bitsandbytes; adamw on CPU), adamw, adamw_fused, "
        "adamw_8bit, paged_adamw_8bit, paged_adamw_32bit (paged: never-freed buffers, a sync per parameter)"
    ),
    "gradient_checkpointing": "recompute block activations in backward (saves memory)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scaling alpha / r)",
    "lora_dropout": "LoRA dropout",
    "lora_dropout_impl": "lanes: CPU masks from 64-bit random words (p rounded to a multiple of 2^-16, about 3.5x "
    "cheaper than torch's); torch: peft's nn.Dropout",
    "target_init": "previous: LoRA on M_{t-1} (sDPO); base: on S (the paper's ablation)",
    "revision": "hub branch, tag or commit of --model (a run pins the commit it resolved to)",
    "reference": "exact: M_{t-1} = Q(S) + finished adapters as a frozen low-rank delta; requantized: quantise(S + sum dW)",
    "merge": "with --reference requantized: exact: quantise(S + sum dW) from S's full-precision weights; inplace: dequantise-add-requantise",
    "compute_dtype": (
        "auto (bfloat16 on cards with it, float16 on older ones, float32 on CPU), bfloat16, float16, float32"
    ),
    "double_quant": "NF4 double quantisation of the block scales",
    "logprob_impl": "auto, triton, torch, naive: the fused lm-head log-prob implementation",
    "deterministic": "bit-identical log-prob gradients run to run: the ordered torch kernel instead of Triton's atomics",
    "device": "auto, cpu, cuda",
    "bound_cpu_heap": "CPU runs on glibc's malloc (see --cpu-allocator): return freed activations to the system "
    "(glibc's mmap threshold fixed): far less RSS, more CPU time per step",
    "save_every": "write a resumable checkpoint every N optimiser steps",
    "diagnostics": "also compute gamma of S on each step's data, and in exact mode each step's training shift "
    "(P_t on a sample of D_t; requantized mode always measures it)",
    "eval_split": "a seeded fraction of each step's data held out of training and evaluated (0: none)",
    "eval_steps": "held-out pairs in the --steps grammar: one item for every step, or one item per step",
    "eval_every": "also evaluate the held-out pairs every N optimiser steps (0: at the end of each step only)",
    "report_to": "also send metrics.jsonl's rows to a tracker: none, tensorboard, wandb, trackio (if installed)",
    "quiet": "no progress bars, notes or tables: one line per long phase",
}
BOOL_FIELDS = ("gradient_checkpointing", "double_quant", "deterministic", "diagnostics", "quiet", "bound_cpu_heap")
SKIP = ("loss", "loss_options")  # added by add_loss_arguments


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    skip: tuple[str, ...] = (),
    defaults: RunConfig | None = None,
    with_loss: bool = True,
    with_config: bool = True,
) -> None:
    """One flag per RunConfig field (less `skip`); `defaults` are what the help text shows (commands that
    train with other defaults, sft and self-reward, pass theirs)."""
    defaults = defaults or RunConfig()
    for f in fields(RunConfig):
        if f.name in SKIP or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = (
            f"{HELP.get(f.name, f.name)} (default {default})"
            if default not in ("", None)
            else HELP.get(f.name, "")
        )
        if f.name in BOOL_FIELDS:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            kind: Any = {int: int, float: float}.get(type(default), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    if not with_loss:
        return
    add_loss_arguments(parser)
    parser.set_defaults(loss=None)  # so that a --config file's loss is not overridden by the flag default
    if not with_config:
        return
    parser.add_argument(
        "--config", help="YAML file of options (keys as the flags, - or _); flags override it"
    )


def register(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="train sDPO steps into a run directory", description=__doc__)
    add_run_arguments(run)
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir (or its default, same flags)"
    )
    add_num_processes_argument(run)
    add_cpu_allocator_argument(run)
    run.set_defaults(handler=run_command)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """defaults < --config file < flags; loss options likewise (a file may hold them at the top level)."""
    from lowmem_sdpo.losses import LOSSES

    option_keys = {k for spec in LOSSES.values() for k in spec.options}
    file_values = read_config_file(args.config, extra_keys=option_keys) if args.config else {}
    file_options = {k: file_values.pop(k) for k in list(file_values) if k in option_keys}
    file_options |= dict(file_values.pop("loss_options", None) or {})
    flag_values = {f.name: getattr(args, f.name, None) for f in fields(RunConfig) if f.name not in SKIP}
    file_loss = file_values.pop("loss", None)
    loss = args.loss or file_loss or RunConfig().loss
    merged = argparse.Namespace(**{k: file_options.get(k) for k in option_keys})
    for key in option_keys:
        if getattr(args, key, None) is not None:
            setattr(merged, key, getattr(args, key))
    options = loss_options_from_args(loss, merged)
    if flag_values["max_prompt_length"] is None and "max_prompt_length" not in file_values:
        max_length = flag_values["max_length"] or file_values.get("max_length")
        flag_values["max_prompt_length"] = default_prompt_length(max_length)
    return build_config(file_values, {**flag_values, "loss": loss, "loss_options": options})


def run_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_num_processes(args.num_processes)
    parse_steps(config.steps)  # each item's grammar, and a named local file exists, before anything loads
    if config.eval_steps:
        parse_steps(config.eval_steps, "--eval-steps")
    check_run_dir(config, resume=args.resume)  # before anything is loaded or written
    restart_if_asked(args, config.device)  # a CPU run under tcmalloc where installed: before anything loads

    from lowmem_sdpo.engine import run_sdpo
    from lowmem_sdpo.runtime.distributed import launched_rank
    from lowmem_sdpo.runtime.failures import TrainingStopped

    launched = launch_if_asked(args)  # bad input has been refused above, once, before any rank starts
    if launched is not None:
        return launched
    main_rank = launched_rank() == 0  # under a launcher only rank 0 speaks
    if not config.quiet and main_rank:
        print(f"run directory: {config.output_dir}")
    try:
        summaries = run_sdpo(config, resume=args.resume)
    except TrainingStopped as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if not config.quiet and main_rank:
        print(
            f"done: {len(summaries)} step(s) in {config.output_dir}; export with "
            f"`lowmem-sdpo export --run {config.output_dir} --out DIR`"
        )
    return 0
