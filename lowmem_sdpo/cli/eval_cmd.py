"""`lowmem-sdpo eval --run RUN`: a finished run's models M_t on preference data (`--data SPEC`: reward accuracy
and margins against M_{t-1} or S, beside S's own ranking) and on lm-evaluation-harness tasks (`--lm-eval
TASKS`, or the `h4` preset). Results go to RUN/eval/*.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowmem_sdpo.checks import check_number
from lowmem_sdpo.errors import InputError


def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a run's models on preference data or lm-eval tasks",
                               description=__doc__)
    ev.add_argument("--run", required=True, help="the run directory (holds run.json)")
    ev.add_argument("--step", type=int, default=None, help="evaluate M_t of this step only (default: every finished step)")
    ev.add_argument("--data", default=None, help="preference data in the --steps grammar (one result file per item)")
    ev.add_argument("--against", choices=("M_{t-1}", "S"), default=None,
                    help="--data: the reference of M_t's implicit rewards (default M_{t-1}, what step t trained "
                         "against)")
    ev.add_argument("--lm-eval", default=None, metavar="TASKS",
                    help="lm-evaluation-harness tasks A,B,... or the preset h4 (pip install 'lowmem-sdpo[eval]')")
    ev.add_argument("--num-fewshot", type=int, default=None, help="--lm-eval: shots for every named task")
    ev.add_argument("--lm-eval-include", default=None, metavar="DIR", help="--lm-eval: a directory of task YAMLs")
    ev.add_argument("--lm-eval-include-only", action="store_true",
                    help="--lm-eval: index only --lm-eval-include's tasks, not the harness's own (faster)")
    ev.add_argument("--limit", type=int, default=None, help="--lm-eval: at most this many documents per task")
    ev.add_argument("--lm-eval-batch-size", default=None,
                    help="--lm-eval: the harness's batch size (or 'auto'; default 1)")
    ev.add_argument("--lm-eval-samples", action="store_true",
                    help="--lm-eval: keep every document's inputs and log-likelihoods in the result file")
    ev.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="--lm-eval: an exported checkpoint (lowmem-sdpo export) instead of S + the run's adapters")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(handler=eval_command)


# Options that only mean something with another one: given without it they are refused, not ignored.
NEEDS: dict[str, tuple[str, str]] = {
    "limit": ("lm_eval", "--lm-eval"),
    "num_fewshot": ("lm_eval", "--lm-eval"),
    "lm_eval_include": ("lm_eval", "--lm-eval"),
    "lm_eval_include_only": ("lm_eval", "--lm-eval"),
    "lm_eval_batch_size": ("lm_eval", "--lm-eval"),
    "lm_eval_samples": ("lm_eval", "--lm-eval"),
    "checkpoint": ("lm_eval", "--lm-eval"),
    "against": ("data", "--data"),
}


def check_eval_args(args: argparse.Namespace) -> None:
    """Everything eval can check before a model loads."""
    if not args.data and not args.lm_eval:
        raise InputError("eval: nothing to do; give --data SPEC and/or --lm-eval TASKS")
    for option, (needed, flag) in NEEDS.items():
        if getattr(args, option) not in (None, False) and not getattr(args, needed):
            raise InputError(f"--{option.replace('_', '-')} applies to {flag} only; drop it or add {flag}")
    if args.data:
        from lowmem_sdpo.data.spec import parse_steps

        parse_steps(args.data, "--data")  # each item's grammar, and a named local file exists
    if args.step is not None:
        check_number("--step", args.step, low=1, integer=True)
    if args.limit is not None:
        check_number("--limit", args.limit, low=1, integer=True)
    if args.num_fewshot is not None:
        check_number("--num-fewshot", args.num_fewshot, low=0, integer=True)
    if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
        raise InputError(f"--checkpoint {args.checkpoint}: no config.json (expected `lowmem-sdpo export` output)")


def eval_command(args: argparse.Namespace) -> int:
    check_eval_args(args)

    from lowmem_sdpo.eval.runmodels import open_run
    from lowmem_sdpo.runtime.reporting import Reporter

    tasks = manager = None
    if args.lm_eval:
        from lowmem_sdpo.eval.harness import check_tasks, harness_version, parse_tasks, task_manager

        harness_version()  # one line naming the extra to install, before anything slow
        tasks = parse_tasks(args.lm_eval, args.num_fewshot)
        # The task names are looked up now, not after the model has loaded.
        manager = task_manager(args.lm_eval_include, args.lm_eval_include_only)
        check_tasks(tasks[1], manager)
    reporter = Reporter(args.quiet)
    models = open_run(Path(args.run), reporter)
    try:
        steps = models.steps(args.step)
        written: list[Path] = []
        if args.data:
            from lowmem_sdpo.eval.preference import evaluate_preferences

            written += evaluate_preferences(models, args.data, steps, args.against or "M_{t-1}", reporter)
        if tasks is not None:
            written += _lm_eval(models, args, tasks, manager, steps, reporter)
    finally:
        models.close()
    for path in written:
        reporter.note(f"wrote {path}")
    return 0


def _lm_eval(
    models: Any, args: argparse.Namespace, tasks: Any, manager: Any, steps: list[int], reporter: Any
) -> list[Path]:
    from lowmem_sdpo.atomic import write_json
    from lowmem_sdpo.eval.harness import hflm, run_harness
    from lowmem_sdpo.eval.preference import slug

    name, chosen = tasks
    targets: list[tuple[str, Any, int | None]] = (
        [(Path(args.checkpoint).name, str(args.checkpoint), None)]
        if args.checkpoint
        else [(f"M{t}", None, t) for t in steps]
    )
    written = []
    for label, checkpoint, t in targets:
        model = checkpoint if checkpoint is not None else models.model(t)
        reporter.note(f"lm-eval: {name} on {label if checkpoint else f'M_{t}'}")
        lm = hflm(model, models.tokenizer, device=str(models.hw.device), batch_size=args.lm_eval_batch_size or "1",
                  dtype=models.hw.compute_dtype)
        result = run_harness(lm, chosen, manager=manager, limit=args.limit, log_samples=args.lm_eval_samples)
        result |= {"model": checkpoint or f"M_{t}", "step": t, "tasks": args.lm_eval, "limit": args.limit}
        path = models.out / f"lm-eval-{slug(name)[:60]}-{slug(label)}.json"
        write_json(path, result)
        written.append(path)
        rows = [(task, f"{s['value']:.4f} ({s['metric']}, {s['num_fewshot']}-shot)") for task, s in result["scores"].items()]
        for run in result["calls"]:
            for task, figures in (run.get("results") or {}).items():
                rows += [(f"{task} {k.split(',')[0]}", f"{v:.4f}") for k, v in figures.items()
                         if isinstance(v, float) and "stderr" not in k]
        reporter.table(f"lm-eval: {label} (lm_eval {result['lm_eval_version']})", rows)
    return written
