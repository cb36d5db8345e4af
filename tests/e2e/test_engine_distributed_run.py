"""Data-parallel runs on 2 gloo processes: the same adapters and reference cache as one process with the same
global batch (`lowmem-sdpo run --num-processes 2`, through accelerate's launcher), and a SIGKILL of both ranks
followed by --resume (on 2 ranks, or on 1) ends with the adapters of the uninterrupted run (ranks started
directly with the launcher's environment: one process fewer to start on a busy machine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_sdpo.models.tiny import single_thread
from tests.support.distributed_fixtures import start_ranks
from tests.support.engine_fixtures import adapter_tensors, cli_flags, run, small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # as each rank runs (torchrun sets OMP_NUM_THREADS=1)
        yield

# An effective batch of 8 units, 24 pairs -> 3 optimiser steps per sDPO step: one process with 4 micro-batches
# of 2, or 2 ranks each with 2 micro-batches of 2 (each rank's forwards are then the very forwards of the one
# process, and only the order the gradients are summed in differs). The reference batch size is set (not auto,
# 2 x batch) so that both pass the same batches: the caches are then equal bit for bit.
# The loss options as the CLI fills them in, so that an in-process run can resume a CLI-made one.
SETTINGS = {"n": 24, "batch_size": 2, "reference_batch_size": 4, "save_every": 1, "loss_options": {"label_smoothing": 0.0}}
ONE = {**SETTINGS, "grad_accum": 4}
TWO = {**SETTINGS, "grad_accum": 2}
CACHE = "reference_logps.safetensors"


def _command(config, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lowmem_sdpo", "run", *cli_flags(config), "--num-processes", "2", *extra]


def _ranks(config, *extra: str) -> list[subprocess.Popen]:
    return start_ranks(["-m", "lowmem_sdpo", "run", *cli_flags(config), *extra])


def _finish(procs: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-3000:] for o in outputs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    one = small_config(tmp, "one", **ONE)
    run(one)  # also builds the tiny model before two ranks would race to
    two = small_config(tmp, "two", **TWO)
    done = subprocess.run(_command(two), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, Path(one.output_dir), Path(two.output_dir)


def _close_adapters(a: Path, b: Path, exact: bool = False) -> None:
    """Exact, or equal within fp32 tolerance. The gradients differ in their last bits only (the order they are
    summed in), but AdamW divides each by its own running magnitude: where a gradient is ~0 a last-bit change
    moves that component by up to a learning-rate step. So all but a handful of components agree within 1e-5
    and none differs by a whole step (lr 1e-2); a wrong shard or a missing all-reduce moves nearly all of them.
    """
    for t in (1, 2):
        x, y = adapter_tensors(a, t), adapter_tensors(b, t)
        assert x.keys() == y.keys()
        if exact:
            assert all(torch.equal(x[k], y[k]) for k in x), t
            continue
        diff = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
        assert float(diff.quantile(0.999)) <= 1e-5, t
        assert float(diff.max()) < 1e-2, t


def _cache(run_dir: Path, t: int) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(run_dir / f"step-{t}" / CACHE), framework="pt") as f:
        return json.loads(f.metadata()["lowmem_sdpo_cache_parts"]), {k: f.get_tensor(k) for k in f.keys()}


def test_two_ranks_equal_one_process_with_the_same_global_batch(runs):
    _, one, two = runs
    _close_adapters(one, two)
    # Step 1's reference (S) is the same bit for bit, under the same key: nothing in the key depends on the
    # number of ranks, so a rerun on any number of ranks reuses the cache.
    (parts_one, table_one), (parts_two, table_two) = _cache(one, 1), _cache(two, 1)
    assert parts_one == parts_two
    assert table_one.keys() == table_two.keys() and all(torch.equal(table_one[k], table_two[k]) for k in table_one)
    # Step 2's reference is M_1, whose adapter differs in its last bits (above): only that part of the key.
    (parts_one, table_one), (parts_two, table_two) = _cache(one, 2), _cache(two, 2)
    assert {k: v for k, v in parts_one.items() if k != "adapters"} == {
        k: v for k, v in parts_two.items() if k != "adapters"
    }
    assert all(torch.allclose(table_one[k], table_two[k], rtol=0, atol=1e-4) for k in table_one)
    for t in (1, 2):
        rows = [
            [json.loads(line) for line in (d / f"step-{t}" / "metrics.jsonl").read_text().splitlines()]
            for d in (one, two)
        ]
        assert len(rows[0]) == len(rows[1]) == 3
        for a, b in zip(*rows, strict=True):
            assert a["units"] == b["units"] and a["tokens"] == b["tokens"]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
            assert b["reward_accuracy"] == pytest.approx(a["reward_accuracy"])
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert not list(two.rglob(".*.tmp"))  # rank 0 alone wrote: no second writer's leftovers


def _opt_steps_saved(step_dir: Path) -> int:
    try:
        return json.loads((step_dir / "checkpoint" / "state.json").read_text())["opt_steps_done"]
    except (OSError, ValueError):  # not written yet, or mid-replacement
        return 0


def test_sigkill_of_two_ranks_then_resume_ends_with_the_same_adapters(runs):
    tmp, one, two = runs
    killed = small_config(tmp, "killed", **TWO)
    out = Path(killed.output_dir)
    procs = _ranks(killed)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if _opt_steps_saved(out / "step-1") >= 1:
            break
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
    for p in procs:
        p.kill()  # SIGKILL: nothing is saved on the way out
    for p in procs:
        p.communicate(timeout=60)
    stopped = [p.parent.parent for p in out.glob("step-*/checkpoint/state.json")]
    assert len(stopped) == 1 and not (stopped[0] / "summary.json").exists()
    shutil.copytree(out, tmp / "killed-one")
    cache = tmp / "killed-one" / stopped[0].name / CACHE
    cache_mtime = cache.stat().st_mtime_ns

    _finish(_ranks(killed, "--resume"))
    _close_adapters(two, out, exact=True)  # the same ranks: the uninterrupted run's adapters exactly

    # Another rank count at the same effective batch (1 process x 4 micro-batches) resumes it too.
    run(small_config(tmp, "killed-one", **ONE), resume=True)
    assert cache.stat().st_mtime_ns == cache_mtime  # the 2-rank reference cache was reused by 1 process
    _close_adapters(two, tmp / "killed-one")
    _close_adapters(one, tmp / "killed-one")
