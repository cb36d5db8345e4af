"""`lowmem-sdpo export`: write M_t = S + dW_1 + ... + dW_t of a run as a bf16 Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowmem_sdpo.errors import InputError


def register(subparsers: Any) -> None:
    export = subparsers.add_parser("export", help="write a step's merged model as a Hugging Face checkpoint")
    export.add_argument("--run", required=True, help="the run directory (holds run.json)")
    export.add_argument("--step", type=int, default=None, help="which M_t (default: the last finished step)")
    export.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty, or an earlier export (replaced atomically); anything else is refused",
    )
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(handler=export_command)


def adapter_chain(run_dir: Path, step: int | None) -> tuple[Path, list[Path], int]:
    """(model dir, adapters making M_t, t) from a run directory."""
    from lowmem_sdpo.engine.rundir.layout import RUN_FILE, step_dir
    from lowmem_sdpo.engine.rundir.metrics import read_summary
    from lowmem_sdpo.models import resolve_model

    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise InputError(f"--run {run_dir}: no {RUN_FILE} (not a lowmem-sdpo run directory)")
    run = json.loads(run_file.read_text())
    n_steps = len(run.get("data", []))
    summaries = {t: read_summary(step_dir(run_dir, t)) for t in range(1, n_steps + 1)}
    finished = [t for t, summary in summaries.items() if summary is not None]
    if not finished:
        raise InputError(f"--run {run_dir}: no finished step yet (no step-t/summary.json)")
    t = finished[-1] if step is None else step
    if t not in finished:
        raise InputError(
            f"--step {t}: not a finished step of {run_dir} (finished: {', '.join(map(str, finished))})"
        )
    summary = summaries[t] or {}
    model_dir = Path(run["model_dir"])
    if not (model_dir / "config.json").is_file():
        model_dir = resolve_model(run["config"]["model"])
    return model_dir, [run_dir / c for c in summary["adapter_chain"]], t


def export_command(args: argparse.Namespace) -> int:
    from lowmem_sdpo.checks import check_replaceable_dir

    run_dir = Path(args.run)
    # The target first, before anything is read or imported: an existing path that is not an earlier export
    # (a user's directory, the run itself, a data file) is refused and left exactly as it is.
    check_replaceable_dir("--out", Path(args.out), "export", keep=(run_dir,))
    model_dir, chain, t = adapter_chain(run_dir, args.step)

    import torch

    from lowmem_sdpo.models import DeltaKept, export_merged
    from lowmem_sdpo.runtime.reporting import Reporter

    reporter = Reporter(args.quiet)
    kept = DeltaKept()
    out = export_merged(
        model_dir,
        chain,
        Path(args.out),
        dtype=getattr(torch, args.dtype),
        progress=reporter.merge_progress(),
        kept=kept,
    )
    reporter.note(f"exported M_{t} (S + {len(chain)} adapter(s)) to {out}")
    note = rounding_note(kept.fraction, args.dtype)
    if note:
        print(note, file=sys.stderr)  # a warning: shown under --quiet too
    return 0


# Below this share of the trained change carried by the checkpoint, export says so.
KEPT_WARNING = 0.9


def rounding_note(fraction: float | None, dtype: str) -> str | None:
    """One line when the cast to `dtype` dropped much of what training changed, else None."""
    if fraction is None or fraction >= KEPT_WARNING:
        return None
    return (
        f"warning: the {dtype} checkpoint carries {fraction:.1%} of what training changed: updates under half a "
        f"{dtype} step of their weight round away in the cast; --dtype float32 keeps them"
    )
