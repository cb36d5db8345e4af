"""Each hub layout, written with the hubs' exact column names and nesting, in JSON Lines, Parquet and a local
`datasets` directory, normalises to the same PreferencePair / UnpairedExample values."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem_sdpo.data import PreferencePair, UnpairedExample, load_steps, parse_columns
from lowmem_sdpo.errors import InputError


def msg(role, content):
    return {"content": content, "role": role}  # the hubs' key order


def ultrafeedback_row(i, prompt, good, bad, source):
    chosen = [msg("user", prompt), msg("assistant", good)]
    return {
        "prompt": prompt,
        "prompt_id": f"{i:064x}",
        "chosen": chosen,
        "rejected": [msg("user", prompt), msg("assistant", bad)],
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 4.5,
        "source": source,
    }


ULTRAFEEDBACK = [
    ultrafeedback_row(0, "What is 2+2?", "4", "5", "evol_instruct"),
    ultrafeedback_row(1, "Name a colour.", "Blue.", "Seven.", "sharegpt"),
    ultrafeedback_row(2, "Say hi.", "Hi!", "Hi!", "sharegpt"),  # identical answers: dropped
]
ORCA = [
    {"system": "You are helpful.", "question": "2+2?", "chosen": "4", "rejected": "22"},
    {"system": "", "question": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]
BEAVERTAILS_CATEGORY = {
    "animal_abuse": False,
    "privacy_violation": True,
    "violence,aiding_and_abetting,incitement": False,
}
BEAVERTAILS = [
    {"prompt": "How do I find someone's address?", "response": "I can't help with that.",
     "category": dict.fromkeys(BEAVERTAILS_CATEGORY, False), "is_safe": True},
    {"prompt": "How do I find someone's address?", "response": "Look them up and follow them.",
     "category": BEAVERTAILS_CATEGORY, "is_safe": False},
]  # fmt: skip
HELPSTEER = [
    {"prompt": "Explain rain.", "response": "Water falls.", "helpfulness": 2, "correctness": 3, "coherence": 4,
     "complexity": 1, "verbosity": 1},
    {"prompt": "Explain rain.", "response": "Clouds condense vapour into drops that fall.", "helpfulness": 3,
     "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2},
    {"prompt": "Explain snow.", "response": "Frozen vapour crystals fall.", "helpfulness": 4, "correctness": 4,
     "coherence": 4, "complexity": 2, "verbosity": 1},
]  # fmt: skip


def user(text):
    return [{"role": "user", "content": text}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}


@pytest.fixture(params=sorted(WRITERS))
def write(request, tmp_path):
    fmt = request.param
    return lambda name, rows: WRITERS[fmt](tmp_path / f"{name}.{fmt}", rows)


def only_step(spec, **kwargs):
    (step,) = load_steps(str(spec), **kwargs)
    return step


def test_ultrafeedback_conversational(write):
    step = only_step(write("uf", ULTRAFEEDBACK))
    assert step.schema == "conversational"
    assert step.pairs == [
        PreferencePair(user("What is 2+2?"), "4", "5"),
        PreferencePair(user("Name a colour."), "Blue.", "Seven."),
    ]
    assert step.n_source_rows == 3 and step.drops == {"identical_answers": 1}


def test_trl_conversational_prompt_list_and_answer_only_lists(write):
    rows = [{"prompt": [msg("system", "Be terse."), msg("user", "2+2?")], "chosen": [msg("assistant", "4")],
             "rejected": [msg("assistant", "5")]}]  # fmt: skip
    step = only_step(write("trl", rows))
    assert step.schema == "conversational"
    assert step.pairs == [
        PreferencePair([{"role": "system", "content": "Be terse."}, *user("2+2?")], "4", "5")
    ]


def test_implicit_prompt(write):
    turns = [msg("system", "S"), msg("user", "Hello"), msg("assistant", "Hi"), msg("user", "2+2?")]
    rows = [{"chosen": [*turns, msg("assistant", "4")], "rejected": [*turns, msg("assistant", "5")]}]
    step = only_step(write("implicit", rows))
    assert step.schema == "implicit_prompt"
    assert step.pairs == [
        PreferencePair([{"role": m["role"], "content": m["content"]} for m in turns], "4", "5")
    ]


def test_orca_keeps_a_non_empty_system_message(write):
    step = only_step(write("orca", ORCA))
    assert step.schema == "orca"
    assert step.pairs == [
        PreferencePair([{"role": "system", "content": "You are helpful."}, *user("2+2?")], "4", "22"),
        PreferencePair(user("Capital of France?"), "Paris", "Lyon"),
    ]


def test_standard_and_unpaired(write):
    standard = only_step(write("std", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]))
    assert (standard.schema, standard.pairs) == ("standard", [PreferencePair(user("1+1="), "2", "3")])
    rows = [
        {"prompt": "1+1=", "completion": "2", "label": True},
        {"prompt": "1+1=", "completion": "3", "label": False},
    ]
    unpaired = only_step(write("unpaired", rows))
    assert unpaired.schema == "unpaired" and unpaired.pairs == []
    assert unpaired.unpaired == [
        UnpairedExample(user("1+1="), "2", True),
        UnpairedExample(user("1+1="), "3", False),
    ]


def test_beavertails_safe_is_desirable(write):
    step = only_step(write("bt", BEAVERTAILS))
    assert step.schema == "beavertails"
    assert [(e.completion, e.label) for e in step.unpaired] == [
        ("I can't help with that.", True),
        ("Look them up and follow them.", False),
    ]


def test_helpsteer_threshold(write):
    path = write("hs", HELPSTEER)
    step = only_step(path)
    assert step.schema == "helpsteer"
    assert [e.label for e in step.unpaired] == [False, True, True]  # helpfulness 2, 3, 4 against >= 3
    assert [e.label for e in only_step(path, desirable_threshold=4).unpaired] == [False, False, True]


def test_columns_mapping(write):
    rows = [{"question": "1+1=", "good": "2", "bad": "3", "id": 7}]
    step = only_step(write("custom", rows), columns=parse_columns("prompt=question,chosen=good,rejected=bad"))
    assert step.schema == "standard+columns"
    assert step.pairs == [PreferencePair(user("1+1="), "2", "3")]


def test_same_content_same_fingerprint_across_formats(tmp_path):
    a = only_step(write_jsonl(tmp_path / "a.jsonl", ULTRAFEEDBACK))
    b = only_step(write_parquet(tmp_path / "b.parquet", ULTRAFEEDBACK))
    assert a.fingerprint() == b.fingerprint()
    changed = [dict(ULTRAFEEDBACK[0], chosen=[msg("user", "What is 2+2?"), msg("assistant", "four")])]
    assert only_step(write_jsonl(tmp_path / "c.jsonl", changed)).fingerprint() != a.fingerprint()


def test_csv_and_json_files(tmp_path):
    csv_path = tmp_path / "u.csv"
    csv_path.write_text('prompt,completion,label\n"a, b",c,true\nd,e,0\n')
    step = only_step(csv_path)
    assert step.unpaired == [UnpairedExample(user("a, b"), "c", True), UnpairedExample(user("d"), "e", False)]
    json_path = tmp_path / "s.json"
    json_path.write_text(json.dumps(ORCA))
    assert only_step(json_path).pairs == only_step(write_jsonl(tmp_path / "o.jsonl", ORCA)).pairs


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_local_hub_directory_through_load_dataset(tmp_path, hub_cache):
    repo = tmp_path / "Org" / "ultrafeedback"
    (repo / "data").mkdir(parents=True)
    write_parquet(repo / "data" / "train_prefs-00000-of-00001.parquet", ULTRAFEEDBACK)
    write_parquet(repo / "data" / "test_prefs-00000-of-00001.parquet", ULTRAFEEDBACK[:2])
    step = only_step(f"{repo}:test_prefs")
    assert (step.source, step.schema) == (f"{repo}:test_prefs", "conversational")
    assert step.pairs == [
        PreferencePair(user("What is 2+2?"), "4", "5"),
        PreferencePair(user("Name a colour."), "Blue.", "Seven."),
    ]
    halves = load_steps(f"{repo}:train_prefs@2:by=source", seed=0)
    # Strata in sorted order: evol_instruct (1 row) dealt to part 1, then sharegpt's 2 rows to parts 2 and 1.
    assert [s.n_source_rows for s in halves] == [2, 1]
    assert [s.label for s in halves] == [
        f"{repo}:train_prefs@2:by=source [1/2]",
        f"{repo}:train_prefs@2:by=source [2/2]",
    ]
    assert halves[0].pairs[0] == PreferencePair(user("What is 2+2?"), "4", "5")
    assert sum(len(s.pairs) + sum(s.drops.values()) for s in halves) == 3
    with pytest.raises(InputError, match=r"no split 'train' \(it has: test_prefs, train_prefs\)"):
        load_steps(str(repo))  # no split named: `train`, which this dataset lacks


def test_saved_dataset_dict_directory(tmp_path):
    saved = tmp_path / "orca_saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ORCA)}).save_to_disk(str(saved))
    step = only_step(saved)
    assert step.schema == "orca" and len(step.pairs) == 2
    with pytest.raises(InputError, match="no split 'test'"):
        load_steps(f"{saved}:test")
