"""`lowmem-sdpo losses [--json]`: the preference objectives `--loss` accepts, with formulas and options."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lowmem_sdpo.losses import LOSSES, LossSpec
from lowmem_sdpo.losses.specs import TensorInput


def register(subparsers: Any) -> None:
    losses = subparsers.add_parser("losses", help="list the preference objectives (--loss) and their options")
    losses.add_argument("--json", action="store_true", help="print JSON instead of a table")
    losses.set_defaults(handler=run_losses)


def _describe(spec: LossSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data": "paired" if spec.paired_only else "unpaired",
        "formula": spec.formula,
        "paper": spec.paper,
        "needs_tokens": spec.needs_tokens,
        "needs_kl": spec.needs_kl,
        "batch_coupled": spec.batch_coupled,
        "options": {
            key: {
                # Tensor options (KTO's KL log-probs) are inputs the engine passes, not flags.
                "flag": "--" + key.replace("_", "-") if opt.is_flag else None,
                "default": opt.default,
                "type": "Tensor" if opt.type is TensorInput else opt.type.__name__,
                "choices": list(opt.choices) if opt.choices else None,
                "help": opt.help,
            }
            for key, opt in spec.options.items()
        },
    }


def _options_text(options: dict[str, dict[str, Any]]) -> str:
    parts = []
    for key, opt in options.items():
        if opt["flag"] is None:
            parts.append(f"{key} (tensor input)")
        elif opt["choices"]:
            parts.append(f"{opt['flag']} {'|'.join(opt['choices'])} (default {opt['default']})")
        else:
            parts.append(f"{opt['flag']} (default {opt['default']})")
    return "\n".join(parts) or "-"


def run_losses(args: argparse.Namespace) -> int:
    rows = [_describe(spec) for spec in LOSSES.values()]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="preference objectives for --loss (pc/pr: policy chosen/rejected, rc/rr: reference)")
    table.add_column("loss", no_wrap=True, style="bold")
    table.add_column("data", no_wrap=True)
    for header in ("formula", "options", "paper"):
        table.add_column(header, overflow="fold")
    for row in rows:
        data = row["data"] + ("\nbatch-coupled" if row["batch_coupled"] else "")
        # Text() so brackets in formulas are not read as rich markup.
        table.add_row(
            row["name"], data, Text(row["formula"]), Text(_options_text(row["options"])), Text(row["paper"])
        )
    Console().print(table)
    return 0
