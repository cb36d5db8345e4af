"""`lowmem-sdpo run|sft --num-processes N`: the same command data-parallel on N ranks, started by accelerate's
launcher.

It is `accelerate launch --multi_gpu --num_processes N -m lowmem_sdpo run ...` (torchrun underneath: one
process per rank, on GPUs or, with gloo, on CPU), minus the flag itself, plus a free rendezvous port so that
two runs on one machine do not collide on accelerate's default 29500.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence

from lowmem_sdpo.errors import InputError

NUM_PROCESSES_FLAG = "--num-processes"


def add_num_processes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        NUM_PROCESSES_FLAG,
        type=int,
        default=1,
        help=(
            "data-parallel ranks, started with accelerate's launcher (one per GPU; gloo on CPU); the effective "
            "batch is batch-size x grad-accum x ranks (default 1: this process)"
        ),
    )


def check_num_processes(n: int) -> None:
    """Before anything else is checked: a count below 1, or one given inside a launched rank, is refused."""
    if n < 1:
        raise InputError(f"{NUM_PROCESSES_FLAG} must be at least 1, got {n}")
    if n > 1:
        from lowmem_sdpo.runtime.distributed import launched_world

        if launched_world() > 1:
            raise InputError(
                f"{NUM_PROCESSES_FLAG}: this process is already one rank of a launched run; drop the flag"
            )


def launch_if_asked(args: argparse.Namespace) -> int | None:
    """After the command has refused its bad input (once, before any rank starts): with --num-processes N > 1,
    the command's own line run on N ranks, and its exit code; None: run here, in this process."""
    if args.num_processes <= 1:
        return None
    return launch([*getattr(args, "argv", []), *(["--debug"] if args.debug else [])], args.num_processes)


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line each rank runs: `argv` without --num-processes (either spelling)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == NUM_PROCESSES_FLAG:
            skip = True
            continue
        if arg.startswith(NUM_PROCESSES_FLAG + "="):
            continue
        out.append(arg)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: Sequence[str], num_processes: int) -> int:
    """Runs `python -m lowmem_sdpo <argv>` on `num_processes` ranks; returns the exit code of the first rank
    that failed (its own code: 2 bad input, 3 NaN, 130 interrupted, ...), 0 when all finished."""
    try:
        from accelerate.commands.launch import launch_command, launch_command_parser
    except ImportError as err:
        raise InputError(f"{NUM_PROCESSES_FLAG}: needs accelerate (pip install accelerate): {err}") from err
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    port = os.environ.get("MASTER_PORT") or str(free_port())
    args = launch_command_parser().parse_args(
        [
            "--multi_gpu",  # accelerate's name for "torchrun, one process per rank"; gloo on a CPU-only machine
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",  # the engine picks its own compute dtype and autocast
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
            "-m",
            "lowmem_sdpo",
            *worker_argv(argv),
        ]
    )
    try:
        launch_command(args)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        # A rank killed by a signal has a negative code; the shell's convention is 128 + the signal.
        return next((c if c > 0 else 128 - c for c in codes if c), 1)
    except SignalException as err:
        # SIGINT / SIGTERM to the launcher: torchrun has passed it on to the ranks (which stop together at
        # the next optimiser-step boundary, with a checkpoint) and waited for them.
        return 128 + int(err.sigval)
    return 0
