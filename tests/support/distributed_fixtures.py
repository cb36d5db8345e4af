"""Two-rank gloo runs for the data-parallel tests: starting ranks, and the cross-rank window-gradient worker.

`python tests/support/distributed_fixtures.py OUT_DIR` is one rank of the window-gradient check (the launcher's
environment, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, says which): every rank builds the same policy and
reference, runs its part of each case's global window through `accumulate_window`, the gradients are summed
across ranks, and rank 0 saves them for the test to compare with one process running the whole window.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.engine.training.objective import Objective
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks, process_group
from tests.support.window_fixtures import WindowSetup, accumulated_grads, window_job, window_setup

# (loss, options, the global micro-batches of the window). AOT: 3 micro-batches whose parts differ in size,
# one leaving rank 1 nothing; compared with one micro-batch of the whole window in one process. KTO: its KL
# point is per micro-batch, so one process runs the same global micro-batches.
CASES: list[tuple[str, dict[str, Any], list[list[int]]]] = [
    ("aot", {}, [[0, 1, 2], [3], [4, 5, 6, 7]]),
    ("aot_unpaired", {}, [[0, 1, 2], [3], [4, 5, 6, 7]]),
    ("aot", {"aot_sort": "soft", "aot_temperature": 0.05}, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("kto", {}, [[0, 1, 2, 3], [4, 5, 6, 7]]),
]

# Ranks start here, so `-m tests.support.<module>` resolves whatever directory pytest was started from.
REPO = Path(__file__).resolve().parents[2]


def one_process_micro(loss: str, micro: list[list[int]]) -> list[list[int]]:
    """What one process runs for a case: AOT the whole window at once, KTO the same micro-batches."""
    return [[i for mb in micro for i in mb]] if loss.startswith("aot") else micro


def window_grads(
    tmp: Path, setup: WindowSetup, loss: str, options: dict, micro: list[list[int]], ranks: Ranks = SINGLE
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The gradients of one window, summed over ranks (what the optimiser step sees), and its metrics row."""
    job = window_job(tmp, setup, Objective(loss, 0.5, options), ranks)
    return accumulated_grads(setup[3], job, micro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`python argv...` once per rank, joined through env:// on a free port (what a launcher sets up)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def main(out: Path) -> None:
    with process_group() as ranks:
        setup = window_setup(out, ranks)
        results = [window_grads(out, setup, loss, options, micro, ranks) for loss, options, micro in CASES]
        if ranks.is_main:
            torch.save({"results": results, "reference": setup[2]}, out / "grads.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
