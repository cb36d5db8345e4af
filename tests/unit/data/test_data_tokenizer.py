"""The bundled tiny tokenizer: reproducible, AutoTokenizer-loadable, character-level, SOLAR chat template."""

import json
import string

import pytest
from transformers import AutoTokenizer

from lowmem_sdpo.data import load_tokenizer
from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir, render_files, write_tiny_tokenizer
from lowmem_sdpo.data.tokenizer import AnswerEnd, find_answer_end, split_after_prompt
from lowmem_sdpo.errors import InputError


def test_committed_files_equal_a_fresh_build(tmp_path):
    fresh = {name: json.loads(text) for name, text in render_files().items()}
    committed = {name: json.loads((bundled_tokenizer_dir() / name).read_text()) for name in fresh}
    # tokenizer.json: compared on what defines the tokenization (other `tokenizers` versions may add fields).
    for part in ("added_tokens", "post_processor", "decoder"):
        assert committed["tokenizer.json"][part] == fresh["tokenizer.json"][part], part
    assert committed["tokenizer.json"]["model"]["vocab"] == fresh["tokenizer.json"]["model"]["vocab"]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert committed[name] == fresh[name], name
    write_tiny_tokenizer(tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(fresh)


def test_autotokenizer_loads_the_directory_with_special_tokens():
    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len(tok) <= 128
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4


def test_every_printable_character_is_one_token_and_round_trips():
    tok = load_tokenizer("tiny")
    text = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    # BOS is added in front of plain text, EOS is not (Llama convention).
    assert tok("ab")["input_ids"] == [tok.bos_token_id, *ids[text.index("a") : text.index("a") + 2]]


def test_unknown_characters_become_unk():
    tok = load_tokenizer("tiny")
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_chat_template_is_solar_layout():
    tok = load_tokenizer("tiny")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3="},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "### System:\nBe brief.\n\n### User:\n2+2=\n\n### Assistant:\n4\n\n### User:\n3+3=\n\n### Assistant:\n"
    )
    # An empty system message writes no system turn.
    empty_system = [{"role": "system", "content": ""}, {"role": "user", "content": "x"}]
    assert (
        tok.apply_chat_template(empty_system, tokenize=False, add_generation_prompt=False)
        == "### User:\nx\n\n"
    )
    # Turn headers are single tokens, which keeps toy sequences short.
    assert len(tok("### Assistant:\n", add_special_tokens=False)["input_ids"]) == 1


def test_answer_end_is_the_template_tail_cut_after_its_last_special_token():
    tok = load_tokenizer("tiny")
    # The bundled template closes an answer with a blank line only: no special token, so EOS.
    assert find_answer_end(tok) == AnswerEnd(text="", template_tail="\n\n")
    assert find_answer_end(tok).label == "eos"
    # ChatML-like, with the tiny tokenizer's own special tokens: `<s>` opens a turn, `</s>` closes it.
    tok.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    )
    assert find_answer_end(tok) == AnswerEnd(text="</s>", template_tail="</s>\n")
    # Llama-2 style: a space before EOS is kept (it precedes the last special token).
    tok.chat_template = "{% for m in messages %}{{ m['content'] + ' </s>' }}{% endfor %}"
    assert find_answer_end(tok).text == " </s>"
    tok.chat_template = None  # the plain fallback layout ends a turn with a blank line: EOS
    assert find_answer_end(tok).label == "eos"


def test_template_that_drops_assistant_messages_is_refused():
    tok = load_tokenizer("tiny")
    tok.chat_template = "{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="does not write the assistant's message"):
        find_answer_end(tok)


def test_split_after_prompt_worked_by_hand():
    assert split_after_prompt([1, 5, 6], [1, 5, 6, 7, 2]) == ([7, 2], False)
    # The prompt's last token (6) merged into the answer's first (9): the answer starts at the departure.
    assert split_after_prompt([1, 5, 6], [1, 5, 9, 2]) == ([9, 2], True)
