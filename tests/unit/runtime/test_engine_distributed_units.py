"""The data-parallel pieces that need no second process: shards, the launcher's command line, refusals."""

from __future__ import annotations

import pytest

from lowmem_sdpo.cli import main
from lowmem_sdpo.cli.launch import worker_argv
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks, check_launcher, process_group


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_shards_partition_a_micro_batch_in_order(world, n):
    items = list(range(100, 100 + n))
    parts = [Ranks(rank, world).shard(items) for rank in range(world)]
    assert [i for part in parts for i in part] == items  # contiguous, in rank order, nothing lost or repeated
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_zero_keeps_the_one_process_seed():
    assert Ranks(0, 4).seed(7) == SINGLE.seed(7) == 7
    assert len({Ranks(r, 4).seed(7) for r in range(4)}) == 4


def test_worker_command_line_drops_only_the_process_count():
    argv = ["run", "--model", "tiny", "--num-processes", "2", "--steps", "a.jsonl", "--num-processes=3", "--quiet"]
    assert worker_argv(argv) == ["run", "--model", "tiny", "--steps", "a.jsonl", "--quiet"]


def test_one_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as ranks:
        assert ranks == SINGLE and not ranks.is_distributed


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_launch_configs_are_refused(monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(InputError, match="does not"):
        check_launcher()


def test_bad_process_count_is_one_line_exit_2(tmp_path, capsys):
    code = main(
        ["run", "--model", "tiny", "--steps", "x.jsonl", "--output-dir", str(tmp_path / "r"), "--num-processes", "0"]
    )
    assert code == 2
    assert "--num-processes must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_process_count_inside_a_launched_rank_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(
        ["run", "--model", "tiny", "--steps", "x.jsonl", "--output-dir", str(tmp_path / "r"), "--num-processes", "2"]
    )
    assert code == 2
    assert "already one rank" in capsys.readouterr().err
