"""`--cpu-allocator` of the training commands: a CPU run restarts its own command line with tcmalloc preloaded.

Only the command-line process restarts (`lowmem-sdpo ...`, `python -m lowmem_sdpo ...`: cli.entry); main()
called from Python (tests, notebooks) runs where it is, on whatever allocator that process has. The restart is
os.execve: the same process id, arguments and environment plus LD_PRELOAD, before any model is loaded, so a
Ctrl-C, an exit code or a `--num-processes` launch behaves as without it; its ranks inherit the preload.
"""

from __future__ import annotations

import argparse
import os
import sys

from lowmem_sdpo.runtime.cpu_allocator import CHOICES, plan_allocator, preload_environment

FLAG = "--cpu-allocator"


def add_cpu_allocator_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        FLAG,
        choices=CHOICES,
        default="auto",
        help=(
            "CPU runs: the malloc the process runs on. auto (default): tcmalloc where installed (as fast as "
            "glibc's heap at a third of its peak RSS), else glibc with the bounded heap; glibc; tcmalloc; "
            "jemalloc. The command restarts itself with the library in LD_PRELOAD (runtime/cpu_allocator.py)"
        ),
    )


def runs_on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device != "auto":
        return False
    import torch  # only for `auto`: a CUDA machine keeps its activations in CUDA memory

    return not torch.cuda.is_available()


def restart_if_asked(args: argparse.Namespace, device: str) -> None:
    """After the command refused its bad input, before it loads anything: on a CPU run of the command-line
    process whose --cpu-allocator asks for another malloc, replace this process with its own command under
    it (does not return). Otherwise nothing; a named allocator that is missing is refused (exit 2)."""
    choice = getattr(args, "cpu_allocator", "auto")
    if not getattr(args, "own_process", False) or not runs_on_cpu(device):
        return
    plan = plan_allocator(choice)
    if plan.preload is None:
        return
    argv = [sys.executable, "-m", "lowmem_sdpo", *args.argv, *(["--debug"] if args.debug else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, preload_environment(plan, os.environ))
