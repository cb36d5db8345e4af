"""`lowmem-sdpo generate`: sample answers from the 4-bit model, with a run's adapters active (no merge).

Left-padded batches, `-n` answers per prompt, stopping at the chat template's end-of-turn token, seeded per
batch; one JSON line per prompt (prompt, completions, token counts, whether each reached the end of turn),
appended batch by batch so `--resume` continues a killed job without redoing a prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowmem_sdpo.checks import check_input_file, check_output_file
from lowmem_sdpo.errors import InputError

SETTINGS_SUFFIX = ".settings.json"


def register(subparsers: Any) -> None:
    from lowmem_sdpo.selfreward.sampling import CACHE_CHOICES, SampleSettings

    d = SampleSettings()
    gen = subparsers.add_parser(
        "generate", help="sample answers from a model or a run's M_t", description=__doc__
    )
    gen.add_argument("--model", help="hub id, local directory or alias (default with --run: the run's model)")
    gen.add_argument("--run", help="an sDPO run directory: sample from its M_t (S + its adapters, no merge)")
    gen.add_argument("--step", type=int, help="with --run: which M_t (default: the last finished step)")
    gen.add_argument(
        "--prompts", required=True, help="JSON Lines with a 'prompt' per row, or .txt, one per line"
    )
    gen.add_argument(
        "-n",
        "--num-return-sequences",
        dest="n",
        type=int,
        default=d.n,
        help=f"answers per prompt (default {d.n})",
    )
    gen.add_argument(
        "--temperature", type=float, default=d.temperature, help=f"0: greedy (default {d.temperature})"
    )
    gen.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling (default {d.top_p})")
    gen.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default {d.max_new_tokens})"
    )
    gen.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"prompts per generate call (default {d.batch_size})",
    )
    gen.add_argument(
        "--cache",
        choices=CACHE_CHOICES,
        default=d.cache,
        help="KV cache: auto = static on CUDA, dynamic on CPU",
    )
    gen.add_argument("--seed", type=int, default=d.seed)
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    gen.add_argument("--out", help="output .jsonl (default: generations.jsonl beside --prompts)")
    gen.add_argument(
        "--resume", action="store_true", help="continue --out, generating only the prompts it lacks"
    )
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(handler=generate_command)


def _model_and_chain(args: argparse.Namespace) -> tuple[str, list[Path], str]:
    """(--model or the run's model, the adapters making M_t, a description)."""
    if args.run is None:
        if args.step is not None:
            raise InputError("--step needs --run (the run whose M_t to sample)")
        if not args.model:
            raise InputError("--model is required (or --run RUN)")
        return args.model, [], args.model
    from lowmem_sdpo.cli.export_cmd import adapter_chain

    model_dir, chain, t = adapter_chain(Path(args.run), args.step)
    return args.model or str(model_dir), chain, f"M_{t} of {args.run}"


def _check_out(out: Path, meta: Path, record: dict[str, Any], resume: bool) -> None:
    """--out's own errors, before the model loads or anything is written. A .jsonl is this command's output
    when its settings file is beside it: only then is it continued (--resume), and only with the same
    settings; without that file its rows could hold other settings (-n 1 beside -n 3), so it is refused."""
    check_output_file("--out", out)
    check_output_file("--out", meta)
    if out.exists() and not resume:
        raise InputError(f"--out {out}: exists; pass --resume to continue it, or choose another file")
    if resume and out.exists() and not meta.is_file():
        raise InputError(
            f"--resume {out}: no {meta.name} beside it, so its settings are unknown; choose another --out"
        )
    if resume and meta.is_file():
        try:
            saved = json.loads(meta.read_text())
        except ValueError as err:
            raise InputError(f"--resume {out}: {meta} is not valid JSON ({err})") from err
        if saved != record:
            raise InputError(f"--resume {out}: it was generated with other settings (see {meta})")


def generate_command(args: argparse.Namespace) -> int:
    from lowmem_sdpo.selfreward.sampling import SampleSettings

    settings = SampleSettings(
        n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, cache=args.cache, seed=args.seed,
    )  # fmt: skip
    settings.check()
    check_input_file("--prompts", Path(args.prompts))
    out = Path(args.out) if args.out else Path(args.prompts).with_name("generations.jsonl")
    check_output_file("--out", out)
    model, chain, what = _model_and_chain(args)
    record = {
        "model": model,
        "adapters": [str(p) for p in chain],
        "prompts": str(args.prompts),
        **settings.__dict__,
    }
    meta = out.with_name(out.name + SETTINGS_SUFFIX)
    _check_out(out, meta, record, args.resume)

    from lowmem_sdpo.atomic import write_json
    from lowmem_sdpo.engine import RunConfig
    from lowmem_sdpo.runtime.reporting import Reporter
    from lowmem_sdpo.selfreward.generation import sample_rows
    from lowmem_sdpo.selfreward.loading import open_sampler
    from lowmem_sdpo.selfreward.loop import candidate_row
    from lowmem_sdpo.selfreward.prompts import read_prompts
    from lowmem_sdpo.selfreward.rowlog import RowLog

    prompts = read_prompts(args.prompts)
    reporter = Reporter(args.quiet)
    config = RunConfig(model=model, device=args.device, compute_dtype=args.compute_dtype)
    sampler = open_sampler(model, config, reporter)
    write_json(meta, record)  # once the model has loaded: a refused start leaves nothing behind
    log = RowLog(out, key=lambda r: r["prompt_index"])
    try:
        reporter.note(
            f"sampling {settings.n} answer(s) per prompt from {what} ({len(prompts)} prompts) -> {out}"
        )
        with reporter.task("generating", len(prompts)) as advance:
            sample_rows(
                sampler.model_for(chain), sampler.tokenizer, prompts, settings,
                done=lambda i: i in log,
                write=lambda batch: log.append(candidate_row(i, prompts[i], row) for i, row in batch),
                advance=advance,
            )  # fmt: skip
    finally:
        sampler.release()
    reporter.note(f"wrote {len(log)} rows to {out}")
    return 0
