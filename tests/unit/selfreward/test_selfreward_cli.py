"""The commands around self-rewarding: `generate` (rows, resume, refusal to overwrite), the paper's S alias,
and one-line input errors."""

from __future__ import annotations

import json

import pytest

from lowmem_sdpo.cli import main
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.model_aliases import resolve_model_alias


def test_solar_sft_alias_names_the_command_then_resolves_to_its_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        resolve_model_alias("solar-10.7b-sft")
    assert "lowmem-sdpo sft --recipe solar-10.7b-sft" in str(err.value)
    built = tmp_path / "runs" / "solar-10.7b-sft" / "model"
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    assert resolve_model_alias("solar-10.7b-sft") == str(built.resolve())


def test_generate_writes_one_row_per_prompt_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1+2=\n\n3+4=\n5+0=\n")
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", "tiny", "--prompts", str(prompts), "-n", "2", "--max-new-tokens", "4",
            "--batch-size", "2", "--device", "cpu", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["1+2=", "3+4=", "5+0="]
    assert all(len(r["candidates"]) == 2 and all(n <= 4 for n in r["tokens"]) for r in rows)
    assert main(args) == 2  # never overwritten silently
    assert "pass --resume" in capsys.readouterr().err
    # a kill after the first batch: the resumed job writes the rest, identical to the uninterrupted rows
    first_batch = out.read_text().splitlines()[:2]
    out.write_text("\n".join(first_batch) + "\n")
    assert main([*args, "--resume"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    changed = [*args, "--resume", "--temperature", "0.5"]
    assert main(changed) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "1+2="}\n{"question": "x"}\n', "line 2: no field 'prompt'"),
        ('{"prompt": ""}\n', "line 1: field 'prompt' is empty"),
        ('{"prompt": [{"role": "user", "content": 3}]}\n', "line 1: field 'prompt' message 1"),
    ],
)
def test_bad_prompts_file_is_one_line_exit_2(tmp_path, capsys, content, expected):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    code = main(["generate", "--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_self_reward_refuses_a_bad_judge_before_loading_anything(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n')
    code = main(["self-reward", "--model", "tiny", "--prompts", str(prompts), "--output-dir", str(tmp_path / "r"),
                 "--judge", "python:no_such_module_here:f"])  # fmt: skip
    assert code == 2 and "cannot import module 'no_such_module_here'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
