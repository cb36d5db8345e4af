"""--max-prompt-length when it is not given: the command's default (512 for run, self-reward and data inspect, as
RunConfig's), or half of --max-length where that is smaller, so `--max-length 256` alone is a valid line. Given
anywhere (flag, --config file, recipe), it is used as it is, and a prompt limit at or over --max-length is still
refused."""

from __future__ import annotations

import json

import pytest

from lowmem_sdpo.cli import build_parser, main
from lowmem_sdpo.cli.run_cmd import config_from_args
from lowmem_sdpo.cli.selfreward_cmd import train_config
from lowmem_sdpo.cli.sft_cmd import sft_config
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.errors import InputError

RUN = ["run", "--model", "tiny", "--steps", "d.jsonl", "--output-dir", "o"]


def _run(*flags: str) -> RunConfig:
    return config_from_args(build_parser().parse_args([*RUN, *flags]))


@pytest.mark.parametrize(
    ("flags", "prompt"),
    [
        ((), 512),  # RunConfig's defaults: 1024 and 512
        (("--max-length", "2048"), 512),
        (("--max-length", "1024"), 512),
        (("--max-length", "256"), 128),
        (("--max-length", "97"), 48),
        (("--max-length", "256", "--max-prompt-length", "200"), 200),  # given: used as it is
    ],
)
def test_run_prompt_length_follows_max_length_unless_given(flags, prompt):
    assert _run(*flags).max_prompt_length == prompt


def test_a_config_files_prompt_length_is_given_too(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"max_length": 256, "max_prompt_length": 200}))
    assert _run("--config", str(config)).max_prompt_length == 200
    config.write_text(json.dumps({"max_length": 256}))  # the file's max_length decides the default
    assert _run("--config", str(config)).max_prompt_length == 128


def test_a_prompt_limit_at_or_over_max_length_is_still_refused():
    with pytest.raises(InputError, match=r"--max-prompt-length 300 must be less than --max-length 256"):
        _run("--max-length", "256", "--max-prompt-length", "300")


def test_sft_and_self_reward_follow_the_same_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    sft = ["sft", "--model", "tiny", "--data", "d.jsonl", "--output-dir", "o"]
    config, _ = sft_config(build_parser().parse_args([*sft, "--max-length", "128"]))
    assert config.max_prompt_length == 64
    config, _ = sft_config(build_parser().parse_args(sft))
    assert config.max_prompt_length == RunConfig().max_prompt_length
    sr = ["self-reward", "--model", "tiny", "--prompts", "p.jsonl", "--output-dir", "o", "--max-length", "200"]
    assert train_config(build_parser().parse_args(sr)).max_prompt_length == 100


def test_data_inspect_tokenizes_as_run_would(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["data", "inspect", "--model", "tiny", "--steps", str(data), "--max-length", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["max_prompt_length"] == 20
