"""Cross-rank losses on 2 gloo processes: AOT's sort window spans both ranks (its gradients equal one process
sorting the whole window at once) and KTO's KL reference point is the global micro-batch's."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.models.tiny import single_thread
from tests.support.distributed_fixtures import CASES, one_process_micro, start_ranks, window_grads
from tests.support.window_fixtures import window_setup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # as each rank runs (torchrun sets OMP_NUM_THREADS=1)
        yield

# Each rank runs tests/support/distributed_fixtures.py as a module, so it imports its helpers as tests.support.*.
WORKER = ["-m", "tests.support.distributed_fixtures"]


def test_cross_rank_windows_give_one_process_gradients(tmp_path):
    setup = window_setup(tmp_path)  # also builds the tiny model before two ranks would race to
    expected = [window_grads(tmp_path, setup, loss, opts, one_process_micro(loss, micro)) for loss, opts, micro in CASES]
    procs = start_ranks([*WORKER, str(tmp_path)])
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    saved = torch.load(tmp_path / "grads.pt", weights_only=False)
    # The sharded reference pass gathers the one-process table bit for bit (KL rows included).
    for name, value in setup[2].tensors().items():
        assert torch.equal(saved["reference"].tensors()[name], value), name
    for (loss, opts, _), (want, want_row), (got, got_row) in zip(CASES, expected, saved["results"], strict=True):
        assert want.keys() == got.keys()
        for name in want:
            # Equal up to float32 summation order (other micro-batch shapes, the sum over ranks).
            scale = want[name].abs().max()
            assert (got[name] - want[name]).abs().max() <= 1e-5 * scale + 1e-8, (loss, opts, name)
        assert any(g.abs().sum() > 0 for g in want.values())
        for key in ("loss", "rewards_chosen", "reward_accuracy", "logps_chosen", "units"):
            assert got_row[key] == pytest.approx(want_row[key], rel=1e-5, abs=1e-7), (loss, key)
