"""`sft --num-processes 2` (2 gloo ranks through accelerate's launcher) ends with the adapter of one process
running the same global batch: the shared loop shards each micro-batch and sums the gradients over ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.cli import main
from lowmem_sdpo.models.tiny import single_thread
from tests.support.engine_fixtures import toy_slice

pytestmark = pytest.mark.slow


def _argv(data: Path, out: Path, batch_size: int) -> list[str]:
    # No dropout: each rank draws its own masks (runtime/distributed.py's RANK_SEED_STRIDE), one process one.
    return ["sft", "--model", "tiny", "--data", str(data), "--output-dir", str(out), "--batch-size",
            str(batch_size), "--grad-accum", "2", "--lora-dropout", "0", "--device", "cpu",
            "--no-gradient-checkpointing", "--max-length", "32", "--max-prompt-length", "24", "--logprob-impl",
            "torch", "--learning-rate", "1e-2", "--save-every", "1", "--quiet"]  # fmt: skip


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    data = toy_slice(tmp_path / "rows.jsonl", 1, 16)
    with single_thread():  # as each rank runs (torchrun sets OMP_NUM_THREADS=1); also builds the tiny model
        assert main(_argv(data, tmp_path / "one", batch_size=2)) == 0
    # 1 example per rank per micro-batch: the global micro-batch is the one process's 2 examples
    command = [sys.executable, "-m", "lowmem_sdpo", *_argv(data, tmp_path / "two", batch_size=1), "--num-processes", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # Within fp32 tolerance, not bit for bit: one process pads 2 rows into one forward where each rank runs
    # 1 row unpadded (BLAS picks kernels by shape), and the gradients are summed in another order. AdamW divides
    # each gradient by its own running magnitude, so where one is ~0 a last-bit change can move that component
    # by up to a learning-rate step: nearly all agree within 1e-5, none by a whole step (lr 1e-2), while a wrong
    # shard or a missing all-reduce moves nearly all of them.
    x, y = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert x.keys() == y.keys()
    diff = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
    assert float(diff.quantile(0.999)) <= 1e-5 and float(diff.max()) < 1e-2
    rows = [
        [json.loads(line) for line in (tmp_path / d / "train" / "metrics.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    ]
    assert len(rows[0]) == len(rows[1]) == 4
    for a, b in zip(*rows, strict=True):
        assert a["answer_tokens"] == b["answer_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    assert not list((tmp_path / "two").rglob(".*.tmp"))  # rank 0 alone wrote: no second writer's leftovers
