"""`lowmem-sdpo data inspect` on the bundled toy data, and `data aliases`."""

import json
from pathlib import Path

from lowmem_sdpo.cli import main
from lowmem_sdpo.data import DATASET_ALIASES

ROOT = Path(__file__).resolve().parents[3]
TOY = f"{ROOT}/examples/data/toy_step1.jsonl,{ROOT}/examples/data/toy_step2.jsonl"


def test_inspect_prints_a_table_per_step_and_an_example(capsys):
    assert main(["data", "inspect", "--model", "tiny", "--steps", TOY]) == 0
    out = capsys.readouterr().out
    for text in ("step 1:", "step 2:", "toy_step1.jsonl", "standard (pairs)", "300", "p50/p95/max", "▌"):
        assert text in out, text
    # The example shows the prompt with BOS, the boundary mark, then the answer with its EOS.
    assert "<s>### User:" in out and "</s>" in out


def test_inspect_json_parses_and_holds_the_stats(capsys):
    assert main(["data", "inspect", "--model", "tiny", "--steps", TOY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["chat_template"] == "tokenizer"
    steps = report["steps"]
    assert [s["schema"] for s in steps] == ["standard", "standard"]
    assert [(s["rows"], s["kept"]) for s in steps] == [(300, 300), (300, 300)]
    assert all(s["dropped"] == {} and s["truncated"] == {} for s in steps)
    example = steps[1]["example"]
    assert example["prompt"].startswith("<s>### User:\n") and example["prompt"].endswith("### Assistant:\n")
    assert example["chosen"].endswith("</s>") and example["rejected"].endswith("</s>")
    question = example["prompt"].split("\n")[1]
    assert int(example["chosen"][: -len("</s>")]) == eval(question[:-1])  # "47+38=" -> 85
    assert len(steps[0]["fingerprint"]) == 64


def test_inspect_reports_truncation_by_reason(capsys):
    # Toy step 1 prompts are 9 tokens ("<s>", "### User:\n", "a+b=", "\n\n", "### Assistant:\n"): with
    # max_length 9 and prompts kept whole (by default they would be cut to half of it) there is no room for any
    # answer.
    assert (
        main(
            [
                "data",
                "inspect",
                "--model",
                "tiny",
                "--steps",
                TOY.split(",")[0],
                "--max-length",
                "9",
                "--max-prompt-length",
                "512",
                "--json",
            ]
        )
        == 0
    )
    (step,) = json.loads(capsys.readouterr().out)["steps"]
    assert step["kept"] == 0 and step["dropped"] == {"no_room_for_answer": 300} and step["example"] is None


def test_aliases_lists_the_registry(capsys):
    assert main(["data", "aliases", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: (r["hub_id"], r["split"]) for r in rows} == {
        "openorca": ("Intel/orca_dpo_pairs", "train"),
        "ultrafeedback": ("allenai/ultrafeedback_binarized_cleaned", "train_prefs"),
        "ultrafeedback-h4": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
        "beavertails": ("PKU-Alignment/BeaverTails", "30k_train"),
        "helpsteer": ("nvidia/HelpSteer", "train"),
    }
    assert main(["data", "aliases"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DATASET_ALIASES)


def test_inspect_tokens_json_lists_ids_and_pieces_worked_by_hand(capsys):
    # Toy step 1 begins with {"prompt": "1+4=", "chosen": "5", "rejected": "6"}; the tiny tokenizer has one
    # token per character and one per turn header.
    step1 = TOY.split(",")[0]
    assert main(["data", "inspect", "--model", "tiny", "--steps", step1, "--tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["answer_end"] == "eos"
    (step,) = report["steps"]
    assert step["boundary_merges"] == 0 and step["template_mismatches"] == 0
    assert len(step["tokens"]) == 2
    first = step["tokens"][0]
    assert first["prompt_pieces"] == [
        "<s>",
        "### User:\n",
        "1",
        "+",
        "4",
        "=",
        "\n",
        "\n",
        "### Assistant:\n",
    ]
    assert first["chosen_pieces"] == ["5", "</s>"] and first["rejected_pieces"] == ["6", "</s>"]
    assert first["prompt_ids"][0] == 1 and first["chosen_ids"][-1] == first["rejected_ids"][-1] == 2
    assert len(first["prompt_ids"]) == len(first["prompt_pieces"]) == 9


def test_inspect_tokens_for_unpaired_steps_and_as_a_table(tmp_path, capsys):
    rows = [
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": "2+3=", "completion": "6", "label": False},
    ]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "inspect", "--model", "tiny", "--steps", str(path), "--tokens", "5", "--json"]) == 0
    (step,) = json.loads(capsys.readouterr().out)["steps"]
    assert [(t["completion_pieces"], t["label"]) for t in step["tokens"]] == [
        (["4", "</s>"], True),
        (["6", "</s>"], False),
    ]
    assert all("chosen_ids" not in t for t in step["tokens"])
    assert main(["data", "inspect", "--model", "tiny", "--steps", str(path), "--tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "first examples as tokens" in out and "completion" in out and "### Assistant:\\n" in out
    assert "boundary merges" in out and "answers end with eos" in out
