"""Command-line entry point: a registry of subcommands, each in its own module.

Each command module exposes `register(subparsers) -> None`, which adds its parser and sets
`handler=<callable(args) -> int>` as a default. Adding a command = one module + one line below.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from lowmem_sdpo import __version__
from lowmem_sdpo.cli.ctrl_c import INTERRUPTED, exit_interrupted, noticing_ctrl_c
from lowmem_sdpo.cli.quiet import quiet_dependencies
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


class OneLineErrors(argparse.ArgumentParser):
    """argparse with its errors on one line (not the usage block), as every other input error is; the
    subparsers it makes are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="lowmem-sdpo",
        description="Stepwise DPO (sDPO) on one consumer GPU.",
    )
    parser.add_argument("--version", action="version", version=f"lowmem-sdpo {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for errors, and the dependencies' warnings"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"lowmem_sdpo.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """`own_process`: this is the command-line process (cli.entry), which a CPU run may restart under another
    malloc (cli/allocator.py); main() called from Python never restarts its caller."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # Ctrl-C at any moment -- parsing, the heavy imports, loading, training -- is one line and 130; the
    # engine's own handler turns one during training into a checkpoint first. An exception after a Ctrl-C is
    # its consequence (an import it cut short, say), so it is reported as the interruption too.
    with noticing_ctrl_c() as ctrl_c:
        try:
            if not debug:
                quiet_dependencies()
            return _dispatch(argv, debug, own_process)
        except Exception:
            if debug or not ctrl_c.seen:
                raise
        except KeyboardInterrupt:
            if debug:
                raise
    print("interrupted", file=sys.stderr)
    return INTERRUPTED


def entry() -> NoReturn:
    """The process entry point (`lowmem-sdpo`, `python -m lowmem_sdpo`): main(), then exit with its code. Once
    main has returned there is nothing left to interrupt, and a Ctrl-C arriving while the interpreter shuts down
    (after Python has restored the default handler) would otherwise kill it by the signal, with no line at all."""
    try:
        code = main(own_process=True)
    except KeyboardInterrupt:  # in the instant between main's handler going and SIG_IGN below
        if "--debug" in sys.argv:
            raise
        print("interrupted", file=sys.stderr)
        code = INTERRUPTED
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == INTERRUPTED:
        exit_interrupted()
    raise SystemExit(code)


def _dispatch(argv: list[str], debug: bool, own_process: bool = False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    args.own_process = own_process
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
