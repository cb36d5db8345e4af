"""tokenize_step and collation, checked token by token against hand-worked sequences of the tiny tokenizer.

Tiny tokenizer facts used below: one token per character; "### User:\\n" and "### Assistant:\\n" are one token
each; BOS is prepended. So the prompt "3+4=" renders as
  <s> | ### User:\\n | 3 + 4 = | \\n \\n | ### Assistant:\\n   = 1 + 1 + 4 + 2 + 1 = 9 tokens,
"10+20=" as 1 + 1 + 6 + 2 + 1 = 11 tokens, and an answer "12" as 1, 2, </s> = 3 tokens.
"""

import logging
import uuid

import pytest
import torch

from lowmem_sdpo.data import (
    IGNORE_INDEX,
    PreferencePair,
    StepData,
    UnpairedExample,
    collate_pairs,
    collate_unpaired,
    load_tokenizer,
    tokenize_step,
)
from lowmem_sdpo.data.tiny_tokenizer import CHAT_TEMPLATE
from lowmem_sdpo.errors import InputError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def user(text):
    return [{"role": "user", "content": text}]


def chars(tok, text):
    """Ids looked up one character at a time (independent of the encode pipeline)."""
    return tok.convert_tokens_to_ids(list(text))


def expected_prompt(tok, question):
    return [
        tok.bos_token_id,
        tok.convert_tokens_to_ids("### User:\n"),
        *chars(tok, question + "\n\n"),
        tok.convert_tokens_to_ids("### Assistant:\n"),
    ]


def step_of(*pairs, drops=None):
    return StepData(
        "t", "t.jsonl", "standard", pairs=list(pairs), n_source_rows=len(pairs), drops=drops or {}
    )


def test_prompt_and_answers_token_by_token(tok):
    out = tokenize_step(step_of(PreferencePair(user("3+4="), "7", "12")), tok)
    (pair,) = out.pairs
    assert pair.prompt_ids == expected_prompt(tok, "3+4=")
    assert len(pair.prompt_ids) == 9
    assert pair.chosen_ids == [*chars(tok, "7"), tok.eos_token_id]
    assert pair.rejected_ids == [*chars(tok, "12"), tok.eos_token_id]
    assert out.settings["chat_template"] == "tokenizer"


def test_collated_labels_mask_prompt_and_padding_and_align_with_inputs(tok):
    pairs = [PreferencePair(user("3+4="), "7", "12"), PreferencePair(user("10+20="), "30", "3")]
    out = tokenize_step(step_of(*pairs), tok)
    batch = collate_pairs(out.pairs, tok.pad_token_id)
    # Longest row: prompt 11 + "30</s>" 3 = 14.
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 14)
    rows = [("3+4=", "7"), ("10+20=", "30"), ("3+4=", "12"), ("10+20=", "3")]  # chosen rows, then rejected
    for r, (question, answer) in enumerate(rows):
        prompt = expected_prompt(tok, question)
        answer_ids = [*chars(tok, answer), tok.eos_token_id]
        n = len(prompt) + len(answer_ids)
        pad = 14 - n
        assert batch["input_ids"][r].tolist() == prompt + answer_ids + [tok.pad_token_id] * pad
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * pad
        assert batch["labels"][r].tolist() == [IGNORE_INDEX] * len(prompt) + answer_ids + [IGNORE_INDEX] * pad
    # Chosen row i and rejected row B+i carry the very same prompt ids.
    for i, p in enumerate(out.pairs):
        assert batch["input_ids"][i, : len(p.prompt_ids)].equal(
            batch["input_ids"][2 + i, : len(p.prompt_ids)]
        )


def test_truncation_and_drop_counts_worked_by_hand(tok):
    pairs = [
        PreferencePair(user("3+4="), "7", "8"),  # prompt 9; answers 2, 2; room 11-9=2 -> kept as is
        PreferencePair(user("3+4="), "12", "13"),  # answers 3, 3 -> both cut to 2 ("12", "13") -> kept
        # prompt 11 > 10 -> cut to <s> + last 9 = 10; room 1 -> "3" and "3": identical -> dropped
        PreferencePair(user("10+20="), "30", "3"),
        # prompt cut as above; room 1 -> "3" and "4" differ -> kept, with prompt, chosen and rejected cut
        PreferencePair(user("10+20="), "30", "4"),
    ]
    out = tokenize_step(
        step_of(*pairs, drops={"identical_answers": 4}), tok, max_length=11, max_prompt_length=10
    )
    assert out.stats["kept"] == 3
    assert out.stats["rows"] == 4 and out.stats["examples"] == 4
    assert out.stats["dropped"] == {"identical_after_truncation": 1, "identical_answers": 4}
    # Kept examples only: chosen/rejected cut in pairs 2 and 4, the prompt in pair 4 (pair 3 counts as a drop).
    assert out.stats["truncated"] == {"chosen": 2, "prompt": 1, "rejected": 2}
    # Raw prompt lengths [9, 9, 11, 11]: p50 = ceil(2.0) = 2nd = 9, p95 = ceil(3.8) = 4th = 11.
    assert out.stats["prompt_tokens"] == {"p50": 9, "p95": 11, "max": 11}
    # Raw answer lengths 2,2 | 3,3 | 3,2 | 3,2 -> sorted [2,2,2,2,3,3,3,3]: p50 = 4th = 2, p95 = ceil(7.6) = 8th = 3.
    assert out.stats["answer_tokens"] == {"p50": 2, "p95": 3, "max": 3}
    assert out.stats["longest_sequence"] == 11
    # A cut answer keeps its start and loses EOS (it did not end there).
    assert out.pairs[1].chosen_ids == chars(tok, "12")
    assert out.pairs[1].rejected_ids == chars(tok, "13")
    assert out.pairs[2].prompt_ids == [tok.bos_token_id, *expected_prompt(tok, "10+20=")[-9:]]
    assert (out.pairs[2].chosen_ids, out.pairs[2].rejected_ids) == (chars(tok, "3"), chars(tok, "4"))


def test_prompt_is_cut_from_the_left_keeping_bos(tok):
    out = tokenize_step(step_of(PreferencePair(user("10+20="), "30", "3")), tok, max_prompt_length=5)
    full = expected_prompt(tok, "10+20=")
    assert out.pairs[0].prompt_ids == [tok.bos_token_id, *full[-4:]]
    assert out.stats["truncated"] == {"prompt": 1}
    assert out.stats["prompt_tokens"]["max"] == 11  # lengths are reported before truncation


def test_no_room_for_answer_is_dropped(tok):
    out = tokenize_step(step_of(PreferencePair(user("3+4="), "7", "8")), tok, max_length=9)
    assert out.pairs == [] and out.stats["dropped"] == {"no_room_for_answer": 1}


def test_bad_lengths_are_input_errors(tok):
    with pytest.raises(InputError, match="max-length"):
        tokenize_step(step_of(PreferencePair(user("a"), "b", "c")), tok, max_length=1)
    with pytest.raises(InputError, match="max-prompt-length"):
        tokenize_step(step_of(PreferencePair(user("a"), "b", "c")), tok, max_prompt_length=0)


def test_template_that_writes_bos_gets_no_second_one():
    tok = load_tokenizer("tiny")
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    out = tokenize_step(step_of(PreferencePair(user("3+4="), "7", "8")), tok)
    load_plain = load_tokenizer("tiny")
    assert (
        out.pairs[0].prompt_ids
        == tokenize_step(step_of(PreferencePair(user("3+4="), "7", "8")), load_plain).pairs[0].prompt_ids
    )
    assert out.pairs[0].prompt_ids.count(tok.bos_token_id) == 1


def test_tokenizer_without_chat_template_uses_plain_format_and_says_so_once(caplog):
    tok = load_tokenizer("tiny")
    tok.chat_template = None
    tok.name_or_path = f"no-template-{uuid.uuid4().hex}"
    step = step_of(PreferencePair([{"role": "system", "content": "S"}, *user("3+4=")], "7", "8"))
    with caplog.at_level(logging.WARNING, logger="lowmem_sdpo.data"):
        first = tokenize_step(step, tok)
        tokenize_step(step, tok)
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1
    assert first.settings["chat_template"] == "fallback"
    assert tok.decode(first.pairs[0].prompt_ids) == "<s>### System:\nS\n\n### User:\n3+4=\n\n### Assistant:\n"


def test_unpaired_examples_and_their_collation(tok):
    step = StepData(
        "u", "u.jsonl", "unpaired",
        unpaired=[UnpairedExample(user("1+1="), "2", True), UnpairedExample(user("1+1="), "11", False)],
        n_source_rows=2,
    )  # fmt: skip
    out = tokenize_step(step, tok)
    assert [e.label for e in out.unpaired] == [True, False]
    assert out.unpaired[1].completion_ids == [*chars(tok, "11"), tok.eos_token_id]
    batch = collate_unpaired(out.unpaired, tok.pad_token_id)
    assert batch["label"].tolist() == [True, False] and batch["label"].dtype == torch.bool
    # prompt 9 tokens; completions "2</s>" (2) and "11</s>" (3) -> width 12.
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 9 + [*chars(tok, "2"), tok.eos_token_id, IGNORE_INDEX],
        [IGNORE_INDEX] * 9 + [*chars(tok, "11"), tok.eos_token_id],
    ]


def test_collate_refuses_an_empty_batch(tok):
    with pytest.raises(ValueError):
        collate_pairs([], tok.pad_token_id)


def test_multi_turn_prompt_and_answer_ids_are_unchanged_worked_by_hand(tok):
    """The joint encoding gives the tiny tokenizer exactly the ids the separate encoding gave: answer
    characters then </s> (its template writes only a blank line after an answer, so EOS closes it)."""
    turns = [*user("1+1="), {"role": "assistant", "content": "2"}, *user("2+2=")]
    out = tokenize_step(step_of(PreferencePair(turns, "4", "22")), tok)
    (pair,) = out.pairs
    header_user, header_assistant = tok.convert_tokens_to_ids(["### User:\n", "### Assistant:\n"])
    assert pair.prompt_ids == [
        tok.bos_token_id,
        header_user, *chars(tok, "1+1=\n\n"),
        header_assistant, *chars(tok, "2\n\n"),
        header_user, *chars(tok, "2+2=\n\n"),
        header_assistant,
    ]  # fmt: skip
    assert pair.chosen_ids == [*chars(tok, "4"), tok.eos_token_id]
    assert pair.rejected_ids == [*chars(tok, "22"), tok.eos_token_id]
    assert out.settings["answer_end"] == "eos"
    assert out.stats["boundary_merges"] == 0 and out.stats["template_mismatches"] == 0


def test_template_end_marker_closes_answers_without_what_follows_it():
    """A Zephyr-style template writes `</s>\\n` after an answer: the answer ends with `</s>`, no newline."""
    tok = load_tokenizer("tiny")
    tok.chat_template = CHAT_TEMPLATE.replace(
        "'### Assistant:\\n' + message['content'] + '\\n\\n'",
        "'### Assistant:\\n' + message['content'] + '</s>\\n'",
    )
    out = tokenize_step(step_of(PreferencePair(user("3+4="), "7", "12")), tok)
    assert out.settings["answer_end"] == "</s>"
    assert out.pairs[0].chosen_ids == [*chars(tok, "7"), tok.eos_token_id]
    assert out.pairs[0].rejected_ids == [*chars(tok, "12"), tok.eos_token_id]


def test_template_whose_conversation_does_not_extend_its_prompt_is_counted():
    """A generation prompt unlike the assistant header (DeepSeek-R1 opens a think block there): the answer
    is placed after the rendered prompt as it is, and the example is counted."""
    tok = load_tokenizer("tiny")
    tok.chat_template = CHAT_TEMPLATE.replace(
        "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}",
        "{% if add_generation_prompt %}{{ '### Assistant:\\n' + '>' }}",
    )
    out = tokenize_step(step_of(PreferencePair(user("3+4="), "7", "12")), tok)
    (pair,) = out.pairs
    assert pair.prompt_ids == [*expected_prompt(tok, "3+4="), *chars(tok, ">")]
    assert pair.chosen_ids == [*chars(tok, "7"), tok.eos_token_id]
    assert out.stats["template_mismatches"] == 1 and out.stats["boundary_merges"] == 0
