"""Bad input never costs data (issue 23): every probe a user could type is refused with its exit code, one
line on stderr, and nothing written, changed or deleted -- the target's bytes are hashed before and after.

The probes run in-process (`main(argv)`), in a fresh working directory each, against a finished one-step
run made from a small saved Llama and adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_sdpo.checks import OUTPUT_MARKER
from lowmem_sdpo.cli import main
from tests.support.model_fixtures import write_adapter, write_llama
from tests.support.probe_fixtures import Probe, run_probe, tree_digest, write_fake_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe-run")
    model = write_llama(root / "model", dtype=torch.float32, with_tokenizer=True)
    adapter = write_adapter(model, root / "adapter", seed=1)
    return write_fake_run(root, model, adapter), model


def _keep_dir(tmp: Path) -> None:
    (tmp / "keep").mkdir()
    (tmp / "keep" / "notes.txt").write_text("keep\n")


def _data_file(tmp: Path) -> None:
    (tmp / "data.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')


def _foreign_report(tmp: Path) -> None:
    # A directory that happens to hold a report.md, made by the user: not ours, so not replaced.
    (tmp / "docs").mkdir()
    (tmp / "docs" / "report.md").write_text("# my notes\n")


EXPORT_PROBES = [
    Probe(["export", "--run", "{run}", "--out", "keep"], says="--out keep", setup=_keep_dir, id="user-dir"),
    Probe(["export", "--run", "{run}", "--out", "{run}"], says="--out", id="the-run-itself"),
    Probe(["export", "--run", "{run}", "--out", "{run}/step-1"], says="--out", id="inside-the-run"),
    Probe(["export", "--run", "{run}", "--out", "data.jsonl"], says="not a directory", setup=_data_file, id="data-file"),
    Probe(["export", "--run", "{run}", "--out", "."], says="current directory", setup=_keep_dir, id="dot"),
    Probe(["export", "--run", "{run}", "--out", "data.jsonl/sub"], says="is a file", setup=_data_file, id="under-a-file"),
    Probe(["export", "--run", "{run}", "--out", "{model}"], says="--out", id="the-model"),
    Probe(["export", "--run", "{run}", "--out", "{model}/.."], says="--out", id="above-the-model"),
    Probe(["report", "{run}", "--out", "docs"], says="--out docs", setup=_foreign_report, id="report-user-dir"),
    Probe(["report", "{run}", "--out", "data.jsonl/r"], says="is a file", setup=_data_file, id="report-under-a-file"),
    Probe(["report", "{run}", "--out", "{run}"], says="--out", id="report-the-run"),
]


@pytest.mark.parametrize("probe", EXPORT_PROBES, ids=[p.id for p in EXPORT_PROBES])
def test_output_probes_leave_everything_as_it_was(probe, finished_run, tmp_path, monkeypatch, capsys):
    run, model = finished_run
    monkeypatch.chdir(tmp_path)
    run_probe(probe, tmp_path, capsys, run=run, model=model)


def test_export_replaces_only_its_own_earlier_output(finished_run, tmp_path, monkeypatch, capsys):
    run, _ = finished_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(run), "--out", "empty", "--quiet"]) == 0  # an empty directory is free
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()
    first = tree_digest(tmp_path / "empty")
    # Exporting again over its own output is allowed, and the same inputs give the same bytes.
    assert main(["export", "--run", str(run), "--out", "empty", "--quiet"]) == 0
    assert tree_digest(tmp_path / "empty") == first
    # Without its marker the same directory is no longer recognised as an export, so it is left alone.
    (tmp_path / "empty" / OUTPUT_MARKER).unlink()
    before = tree_digest(tmp_path / "empty")
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", "empty", "--quiet"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert tree_digest(tmp_path / "empty") == before


# -- numbers, config types, paths of the training and sampling commands -----------------------------------

PAIR = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
JUDGES = '''
import math


def one_argument(prompt):
    return 1.0


def raises(prompt, response):
    raise RuntimeError("judge backend down")


def not_a_number(prompt, response):
    return math.nan


def a_string(prompt, response):
    return "5"
'''


def _inputs(tmp: Path) -> None:
    """A data file, a prompts file, judges, a settings-less generations file, a file to nest paths under."""
    (tmp / "d.jsonl").write_text(PAIR * 4)
    (tmp / "p.txt").write_text("1+2=\n")
    (tmp / "probe_judges.py").write_text(JUDGES)
    (tmp / "old.jsonl").write_text('{"prompt_index": 0, "candidates": ["x"]}\n')
    (tmp / "lots.yaml").write_text('epochs: "lots"\n')
    (tmp / "nan.yaml").write_text("learning_rate: .nan\n")
    (tmp / "gen").mkdir()


RUN = ["run", "--model", "tiny", "--steps", "d.jsonl", "--output-dir", "out"]
SFT = ["sft", "--model", "tiny", "--data", "d.jsonl", "--output-dir", "out"]
GEN = ["generate", "--model", "tiny", "--prompts", "p.txt"]
SR = ["self-reward", "--model", "tiny", "--prompts", "p.txt", "--output-dir", "out"]
INSPECT = ["data", "inspect", "--model", "tiny", "--steps"]

TRAIN_PROBES = [
    Probe([*RUN, "--learning-rate", "nan"], says="--learning-rate", id="run-lr-nan"),
    Probe([*RUN, "--learning-rate", "inf"], says="--learning-rate", id="run-lr-inf"),
    Probe([*RUN, "--beta=-inf"], says="--beta", id="run-beta-minus-inf"),
    Probe([*RUN, "--epochs", "nan"], says="--epochs", id="run-epochs-nan"),
    Probe([*RUN, "--max-grad-norm", "inf"], says="--max-grad-norm", id="run-grad-norm-inf"),
    Probe([*RUN, "--warmup-ratio", "nan"], says="--warmup-ratio", id="run-warmup-nan"),
    Probe([*RUN, "--batch-size", "0"], says="--batch-size", id="run-batch-0"),
    Probe([*RUN, "--loss", "dpop", "--dpop-lambda", "inf"], says="dpop_lambda", id="run-loss-option-inf"),
    Probe([*RUN, "--config", "lots.yaml"], says="epochs", id="run-yaml-wrong-type"),
    Probe([*RUN, "--config", "nan.yaml"], says="--learning-rate", id="run-yaml-nan"),
    Probe([*RUN[:-1], "d.jsonl"], says="--output-dir d.jsonl", id="run-out-is-a-file"),
    Probe([*RUN[:-1], "d.jsonl/x"], says="d.jsonl", id="run-out-under-a-file"),
    Probe([*SFT, "--learning-rate", "nan"], says="--learning-rate", id="sft-lr-nan"),
    Probe([*SFT[:-1], "d.jsonl"], says="--output-dir d.jsonl", id="sft-out-is-a-file"),
    Probe([*SFT[:-1], "d.jsonl/x"], says="d.jsonl", id="sft-out-under-a-file"),
    Probe([*GEN, "--temperature", "nan"], says="--temperature", id="generate-temperature-nan"),
    Probe([*GEN, "--top-p", "inf"], says="--top-p", id="generate-top-p-inf"),
    Probe([*GEN, "--out", "d.jsonl/g.jsonl"], says="is a file", id="generate-out-under-a-file"),
    Probe([*GEN, "--out", "gen"], says="is a directory", id="generate-out-is-a-dir"),
    Probe([*GEN, "--out", "gen", "--resume"], says="is a directory", id="generate-out-dir-resume"),
    Probe([*GEN, "--out", "old.jsonl", "--resume", "-n", "3"], says="settings", id="generate-resume-no-settings"),
    Probe([*SR, "--temperature", "nan"], says="--temperature", id="self-reward-temperature-nan"),
    Probe([*SR, "--judge-temperature", "inf"], says="--judge-temperature", id="self-reward-judge-temp-inf"),
    Probe([*SR, "--learning-rate", "nan"], says="--learning-rate", id="self-reward-lr-nan"),
    Probe([*SR, "--judge", "python:os:getcwd"], says="(prompt, response)", id="judge-no-arguments"),
    Probe([*SR, "--judge", "python:probe_judges:one_argument"], says="(prompt, response)", id="judge-one-argument"),
    Probe([*SR, "--judge", "python:probe_judges:raises"], says="judge backend down", id="judge-raises"),
    Probe([*SR, "--judge", "python:probe_judges:not_a_number"], says="finite", id="judge-returns-nan"),
    Probe([*SR, "--judge", "python:probe_judges:a_string"], says="returned str", id="judge-returns-str"),
    Probe([*SR, "--judge", "./no/such/judge"], says="./no/such/judge", id="judge-model-path-typo"),
    Probe([*SR, "--judge", "python:probe_judges:raises", "--judge-prompt", "p.txt"], says="--judge-prompt applies",
          id="judge-prompt-for-a-python-judge"),
    Probe([*SR[:-1], "d.jsonl"], says="d.jsonl", id="self-reward-out-is-a-file"),
    Probe([*INSPECT, "d.jsonl", "--desirable-threshold", "nan"], says="--desirable-threshold", id="inspect-threshold-nan"),
    Probe([*INSPECT, "d.jsonl", "--max-length", "1"], says="--max-length", id="inspect-max-length-1"),
    Probe([*INSPECT, "nosuch.jsonl"], says="--steps item 'nosuch.jsonl'", id="inspect-no-file"),
    Probe([*RUN, "--epochs", "1", "--beta", "0"], says="--beta must be positive", id="run-beta-0"),
]


@pytest.mark.parametrize("probe", TRAIN_PROBES, ids=[p.id for p in TRAIN_PROBES])
def test_training_and_sampling_probes_write_nothing(probe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.dont_write_bytecode", True)  # importing a judge must not add __pycache__ here
    monkeypatch.syspath_prepend(str(tmp_path))
    probe.setup = _inputs
    run_probe(probe, tmp_path, capsys)


# -- plan: no figure made up from transformers' defaults ------------------------------------------------


def _configs(tmp: Path) -> None:
    import json

    (tmp / "partial").mkdir()
    (tmp / "partial" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    full = {"model_type": "llama", "hidden_size": 4000, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 8000, "vocab_size": 1000}  # fmt: skip
    (tmp / "odd-heads").mkdir()
    (tmp / "odd-heads" / "config.json").write_text(json.dumps(full))
    (tmp / "data.jsonl").write_text(PAIR)


PLAN = ["plan", "--max-length", "512", "--model"]
PLAN_PROBES = [
    Probe([*PLAN, "./partial"], says="no 'num_hidden_layers'", id="plan-incomplete-config"),
    Probe([*PLAN, "./odd-heads"], says="not a multiple of the 3 attention heads", id="plan-heads-do-not-divide"),
    Probe([*PLAN, "./data.jsonl"], says="is a file", id="plan-model-is-a-file"),
    Probe([*PLAN, "tiny", "--tflops", "nan"], says="--tflops", id="plan-tflops-nan"),
]


@pytest.mark.parametrize("probe", PLAN_PROBES, ids=[p.id for p in PLAN_PROBES])
def test_plan_probes(probe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    probe.setup = _configs
    run_probe(probe, tmp_path, capsys)


# -- empty answers: dropped and counted under one reason, by every loader ----------------------------------


def test_empty_answers_are_dropped_and_counted_the_same_way_everywhere(tmp_path, capsys):
    import json

    from lowmem_sdpo.data import load_steps
    from lowmem_sdpo.data.schemas import DROP_EMPTY
    from lowmem_sdpo.sft.data import load_sft_examples

    rows = [
        {"prompt": "a", "chosen": "yes", "rejected": "no"},
        {"prompt": "b", "chosen": "", "rejected": "no"},
        {"prompt": "c", "chosen": "yes", "rejected": "  "},
        {"prompt": "d", "chosen": "ok", "rejected": "bad"},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (step,) = load_steps(str(pairs), seed=0)
    assert [p.prompt[0]["content"] for p in step.pairs] == ["a", "d"]
    assert step.drops == {DROP_EMPTY: 2}
    # data inspect reports them under the same reason, as a run's summary does (tokenize_step's "dropped")
    capsys.readouterr()
    assert main(["data", "inspect", "--model", "tiny", "--steps", str(pairs), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["steps"]
    assert report["dropped"] == {DROP_EMPTY: 2} and report["kept"] == 2 and report["rows"] == 4

    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text(
        json.dumps({"prompt": "a", "completion": "x", "label": True}) + "\n"
        + json.dumps({"prompt": "b", "completion": "", "label": False}) + "\n"
    )  # fmt: skip
    (step,) = load_steps(str(unpaired), seed=0)
    assert len(step.unpaired) == 1 and step.drops == {DROP_EMPTY: 1}

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in [("a", "x"), ("b", ""), ("c", "y")]))
    data = load_sft_examples(str(sft))
    assert len(data.unpaired) == 2 and data.drops == {DROP_EMPTY: 1} and data.n_source_rows == 3
    # sft's preference-row path counts them the same way (its chosen side is the answer)
    data = load_sft_examples(str(pairs))
    assert len(data.unpaired) == 2 and data.drops == {DROP_EMPTY: 2} and data.n_source_rows == 4


# -- eval: options that do not apply, task names and adapters checked before a model loads ------------------


def _broken_run(tmp: Path, run: Path) -> None:
    import shutil

    shutil.copytree(run, tmp / "broken")
    (tmp / "broken" / "step-1" / "adapter" / "adapter_model.safetensors").unlink()


EVAL = ["eval", "--run", "{run}"]
EVAL_PROBES = [
    Probe([*EVAL, "--data", "d.jsonl", "--limit", "3"], says="--limit applies to --lm-eval only", id="eval-limit-without-lm-eval"),
    Probe([*EVAL, "--data", "d.jsonl", "--num-fewshot", "5"], says="--num-fewshot applies", id="eval-fewshot-without-lm-eval"),
    Probe([*EVAL, "--lm-eval", "arc_easy", "--against", "S"], says="--against applies to --data only", id="eval-against-without-data"),
    Probe([*EVAL, "--lm-eval", "nosuch_task", "--lm-eval-include-only", "--lm-eval-include", "."], says="nosuch_task", id="eval-unknown-task"),
    Probe([*EVAL, "--data", "nosuch.jsonl"], says="--data item 'nosuch.jsonl'", id="eval-data-names-its-flag"),
    Probe([*EVAL, "--data", "d.jsonl", "--step", "0"], says="--step", id="eval-step-0"),
    Probe(["eval", "--run", "broken", "--data", "d.jsonl"], says="adapter_model.safetensors, which is missing", id="eval-adapter-missing"),
    Probe(["sft", "--model", "tiny", "--data", "nosuch.jsonl", "--output-dir", "out"], says="--data item", id="sft-data-names-its-flag"),
]


@pytest.mark.parametrize("probe", EVAL_PROBES, ids=[p.id for p in EVAL_PROBES])
def test_eval_probes(probe, finished_run, tmp_path, monkeypatch, capsys):
    run, model = finished_run
    monkeypatch.chdir(tmp_path)

    def setup(tmp: Path) -> None:
        _inputs(tmp)
        _broken_run(tmp, run)

    probe.setup = setup
    run_probe(probe, tmp_path, capsys, run=run, model=model)


# -- hub ids on a machine that cannot reach the hub: one line naming the local alternative, everywhere -------

HUB_MODEL = "nosuch-org/nosuch-model"
HUB_DATA = "nosuch-org/nosuch-data"
OFFLINE_PROBES = [
    Probe(["run", "--model", HUB_MODEL, "--steps", "d.jsonl", "--device", "cpu"], says="local directory", id="run-model"),
    Probe(["sft", "--model", HUB_MODEL, "--data", "d.jsonl", "--output-dir", "out"], says="local directory", id="sft-model"),
    Probe(["generate", "--model", HUB_MODEL, "--prompts", "p.txt", "--out", "g.jsonl"], says="local directory", id="generate-model"),
    Probe(["plan", "--model", HUB_MODEL, "--max-length", "512"], says="local directory", id="plan-model"),
    Probe(["self-reward", "--model", HUB_MODEL, "--prompts", "p.txt", "--output-dir", "out"], says="local directory", id="self-reward-model"),
    Probe(["self-reward", "--model", "tiny", "--judge", HUB_MODEL, "--prompts", "p.txt", "--output-dir", "out"], says="local directory", id="self-reward-judge"),
    Probe(["data", "inspect", "--model", HUB_MODEL, "--steps", "d.jsonl"], says="local directory", id="data-inspect-model"),
    Probe(["run", "--model", "tiny", "--steps", HUB_DATA, "--device", "cpu"], says="local file", id="run-dataset"),
    Probe(["eval", "--run", "{run}", "--data", HUB_DATA], says="local file", id="eval-dataset"),
]


@pytest.mark.parametrize("mode", ["unreachable", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("probe", OFFLINE_PROBES, ids=[p.id for p in OFFLINE_PROBES])
def test_hub_ids_offline_fail_in_one_line(probe, mode, finished_run, tmp_path, monkeypatch, capsys):
    run, model = finished_run
    monkeypatch.chdir(tmp_path)
    if mode == "unreachable":
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
        says = "cannot be reached"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        says = "HF_HUB_OFFLINE is set"
    probe.setup = _inputs
    assert says in run_probe(probe, tmp_path, capsys, run=run, model=model)


def test_demo_replaces_only_an_earlier_demo_run(tmp_path, monkeypatch, capsys):
    import json

    from lowmem_sdpo.cli.demo_cmd import _clear_previous, demo_config

    out = tmp_path / "runs" / "demo"
    config = demo_config(str(out))
    out.mkdir(parents=True)
    # A user's own run of the tiny model on other data, where the demo would write: refused, left as it was.
    theirs = {**config.to_dict(), "steps": "mine.jsonl"}
    (out / "run.json").write_text(json.dumps({"config": theirs}))
    before = tree_digest(out)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--output-dir", str(out), "--quiet"]) == 2
    assert "not a demo run" in capsys.readouterr().err
    assert tree_digest(out) == before
    # The demo's own earlier run is replaced.
    (out / "run.json").write_text(json.dumps({"config": config.to_dict()}))
    _clear_previous(out, config)
    assert not out.exists()
