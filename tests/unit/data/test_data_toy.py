"""The bundled toy data: reproducible from its script, arithmetic right/wrong as labelled, short sequences."""

import json
import subprocess
import sys
from pathlib import Path

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "examples" / "data"


def rows(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_script_regenerates_the_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_toy_data.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    for name in ("toy_step1.jsonl", "toy_step2.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def check_sums(data, operand_range):
    for row in data:
        assert set(row) == {"prompt", "chosen", "rejected"}
        a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
        assert a in operand_range and b in operand_range
        assert int(row["chosen"]) == a + b  # chosen is right
        assert int(row["rejected"]) != a + b and int(row["rejected"]) >= 0  # rejected is wrong


def test_step1_is_single_digit_and_step2_two_digit_sums():
    step1, step2 = rows("toy_step1.jsonl"), rows("toy_step2.jsonl")
    assert len(step1) == len(step2) == 300
    check_sums(step1, range(10))
    check_sums(step2, range(10, 100))
    assert len({r["prompt"] for r in step1}) == 100  # every single-digit problem, three wrong answers each
    assert len({r["prompt"] for r in step2}) == 300
    # Some step-2 problems carry, and some rejected answers are exactly the dropped carry.
    carries = [r for r in step2 if sum(int(x) % 10 for x in r["prompt"].rstrip("=").split("+")) >= 10]
    assert 100 < len(carries) < 200
    assert any(int(r["rejected"]) == int(r["chosen"]) - 10 for r in carries)


def test_toy_sequences_are_short_with_the_tiny_tokenizer():
    tok = load_tokenizer("tiny")
    for step in load_steps(f"{DATA / 'toy_step1.jsonl'},{DATA / 'toy_step2.jsonl'}"):
        out = tokenize_step(step, tok)
        assert out.stats["kept"] == 300
        assert out.stats["longest_sequence"] < 24
