"""Every bad input reaches the user as one line naming the file, row or column: exit code 2, no traceback,
nothing written."""

import json

import pytest

from lowmem_sdpo.cli import main
from lowmem_sdpo.errors import InputError


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
UF_TURN = [{"content": "hi", "role": "user"}]

# name -> (files to write {name: str | bytes}, --steps value, extra CLI args, fragments the message must hold)
CASES = {
    "missing_file": ({}, "{d}/absent.jsonl", [], ["absent.jsonl", "does not exist"]),
    "unknown_alias": ({}, "orcaa", [], ["'orcaa'", "openorca", "ultrafeedback", "helpsteer"]),
    "empty_file": ({"empty.jsonl": ""}, "{d}/empty.jsonl", [], ["empty.jsonl", "empty"]),
    "invalid_json": (
        {"bad.jsonl": jsonl(GOOD) + '{"prompt": "x", "chosen": \n'},
        "{d}/bad.jsonl", [], ["bad.jsonl", "invalid JSON at line 2"],
    ),
    "invalid_json_array": ({"bad.json": '[{"prompt": "x"},\n oops]'}, "{d}/bad.json", [], ["bad.json", "line 2"]),
    "columns_missing": (
        {"odd.jsonl": jsonl({"instruction": "x", "good": "y", "bad": "z"})},
        "{d}/odd.jsonl", [], ["odd.jsonl", "columns found: instruction, good, bad", "known schemas", "standard"],
    ),
    "chosen_wrong_type": (
        {"t.jsonl": jsonl(GOOD, {"prompt": "a", "chosen": 5, "rejected": "b"})},
        "{d}/t.jsonl", [], ["t.jsonl", "line 2", "'chosen'", "string", "int"],
    ),
    "rejected_wrong_type": (
        {"t.jsonl": jsonl({"prompt": "a", "chosen": "b", "rejected": None})},
        "{d}/t.jsonl", [], ["t.jsonl", "line 1", "'rejected'", "null"],
    ),
    "conversational_rejected_not_messages": (
        {"uf.jsonl": jsonl({"prompt": "hi", "chosen": [*UF_TURN, {"content": "a", "role": "assistant"}],
                            "rejected": "plain text"})},
        "{d}/uf.jsonl", [], ["uf.jsonl", "line 1", "'rejected'", "list of {role, content} messages"],
    ),
    "conversational_answer_not_last": (
        {"uf.jsonl": jsonl({"prompt": "hi", "chosen": UF_TURN, "rejected": UF_TURN})},
        "{d}/uf.jsonl", [], ["uf.jsonl", "line 1", "'chosen'", "assistant message"],
    ),
    "empty_prompt": (
        {"e.jsonl": jsonl({"prompt": "  ", "chosen": "a", "rejected": "b"})},
        "{d}/e.jsonl", [], ["e.jsonl", "line 1", "'prompt'", "empty"],
    ),
    "not_utf8": (
        {"latin.jsonl": jsonl(GOOD).encode() + '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")},
        "{d}/latin.jsonl", [], ["latin.jsonl", "line 2", "not UTF-8"],
    ),
    "k_below_one": ({"t.jsonl": jsonl(GOOD)}, "{d}/t.jsonl@0", [], ["t.jsonl@0", "K >= 1"]),
    "more_parts_than_rows": (
        {"t.jsonl": jsonl(GOOD, GOOD)}, "{d}/t.jsonl@3", [], ["t.jsonl", "3 parts", "only 2 rows"],
    ),
    "stratify_column_missing": (
        {"t.jsonl": jsonl(GOOD, GOOD)}, "{d}/t.jsonl@2:by=source", [], ["t.jsonl", "'source'", "columns found"],
    ),
    "split_file_lacks": ({"t.jsonl": jsonl(GOOD)}, "{d}/t.jsonl:test", [], ["t.jsonl", "no split 'test'"]),
    "columns_unknown_name": (
        {"t.jsonl": jsonl(GOOD)}, "{d}/t.jsonl", ["--columns", "answer=x"], ["--columns", "'answer'"],
    ),
    "columns_half_present": (
        {"t.jsonl": jsonl({"question": "q", "good": "g", "bad": "b"})},
        "{d}/t.jsonl", ["--columns", "prompt=question,chosen=good,rejected=worse"], ["t.jsonl", "'worse'"],
    ),
    "label_not_boolean": (
        {"u.jsonl": jsonl({"prompt": "p", "completion": "c", "label": "maybe"})},
        "{d}/u.jsonl", [], ["u.jsonl", "line 1", "'label'", "boolean"],
    ),
    "column_missing_in_a_later_row": (
        {"t.jsonl": jsonl(GOOD, {"prompt": "a", "chosen": "b"})},
        "{d}/t.jsonl", [], ["t.jsonl", "line 2", "'rejected'", "missing"],
    ),
    "hub_dataset_unreachable": ({}, "SomeOrg/absent-dataset", [], ["SomeOrg/absent-dataset", "not in the cache", "local file"]),
    "empty_step_item": ({"t.jsonl": jsonl(GOOD)}, "{d}/t.jsonl,", [], ["item 2 is empty"]),
}  # fmt: skip


def write_case(tmp_path, files):
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2(name, tmp_path, capsys):
    files, steps, extra, fragments = CASES[name]
    write_case(tmp_path, files)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["data", "inspect", "--model", "tiny", "--steps", steps.format(d=tmp_path), *extra])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        main(["data", "inspect", "--model", "tiny", "--steps", str(tmp_path / "absent.jsonl"), "--debug"])


def test_unknown_model_is_one_line(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text(jsonl(GOOD))
    code = main(
        ["data", "inspect", "--model", str(tmp_path / "no-model"), "--steps", str(tmp_path / "t.jsonl")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no-model" in err[0]


def test_split_a_dataset_directory_lacks_is_one_line(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train_prefs-00000-of-00001.jsonl").write_text(jsonl(GOOD))
    code = main(["data", "inspect", "--model", "tiny", "--steps", f"{repo}:test_prefs@2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == f"error: {repo}: no split 'test_prefs' (it has: train_prefs)"
