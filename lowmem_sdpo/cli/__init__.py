"""Command-line entry point: a registry of subcommands, each in its own module.

Each command module exposes `register(subparsers) -> None`, which adds its parser and sets
`handler=<callable(args) -> int>` as a default. Adding a command = one module + one line below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lowmem_sdpo import __version__
from lowmem_sdpo.errors import InputError

# Module names under lowmem_sdpo.cli, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "run_cmd",
    "export_cmd",
    "demo_cmd",
    "data_cmd",
    "losses_cmd",
    "plan_cmd",
    "eval_cmd",
    "report_cmd",
    "sft_cmd",
    "generate_cmd",
    "selfreward_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowmem-sdpo",
        description="Stepwise DPO (sDPO) on one consumer GPU.",
    )
    parser.add_argument("--version", action="version", version=f"lowmem-sdpo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"lowmem_sdpo.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    args.argv = argv  # what `run --num-processes` hands to each rank
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except InputError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
