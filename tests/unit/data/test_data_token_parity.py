"""Tokens as the model sees them: prompt ids + answer ids == the tokenizer's own ids of the whole rendered
conversation, for three real tokenizer families (tests/support/real_tokenizers.py) and every row layout.

The reference is independent of the data layer: the template renders the full conversation, the tokenizer
encodes that text in one call, and the end-of-turn rule is applied by hand: ChatML and Gemma answers end
with their end-of-turn token (the newline the template writes after it is not part of the answer); SOLAR's
template writes nothing after an answer, so EOS closes it.
"""

import json

import pytest

from lowmem_sdpo.data import PreferencePair, StepData, load_steps, load_tokenizer, tokenize_step
from tests.support.real_tokenizers import FAMILIES, SOLAR_TEMPLATE, build_family

QUESTION = "What is the capital of France?"
CHOSEN = "Hello! The capital of France is Paris."
REJECTED = "Hello! It is Rome."
SYSTEM = "Be brief."

ANSWER_END = {"solar": "eos", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}
LAST_PIECE = {"solar": "</s>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


FOLLOW_UP = [system(SYSTEM), user(QUESTION), assistant("Paris."), user("And of Italy?")]

# schema -> (rows, the prompt turns they mean, the answers per row), the last two worked out by hand.
CASES = {
    "standard": (
        [{"prompt": QUESTION, "chosen": CHOSEN, "rejected": REJECTED}],
        [user(QUESTION)],
        [(CHOSEN, REJECTED)],
    ),
    "conversational": (  # UltraFeedback's layout: the prompt turn repeated inside chosen / rejected
        [
            {
                "prompt": QUESTION,
                "chosen": [user(QUESTION), assistant(CHOSEN)],
                "rejected": [user(QUESTION), assistant(REJECTED)],
            }
        ],
        [user(QUESTION)],
        [(CHOSEN, REJECTED)],
    ),
    "implicit_prompt": (  # multi-turn, with a system message
        [
            {
                "chosen": [*FOLLOW_UP, assistant("Hello! The capital of Italy is Rome.")],
                "rejected": [*FOLLOW_UP, assistant("Hello! Paris.")],
            }
        ],
        FOLLOW_UP,
        [("Hello! The capital of Italy is Rome.", "Hello! Paris.")],
    ),
    "orca": (
        [{"system": SYSTEM, "question": QUESTION, "chosen": CHOSEN, "rejected": REJECTED}],
        [system(SYSTEM), user(QUESTION)],
        [(CHOSEN, REJECTED)],
    ),
    "unpaired": (
        [
            {"prompt": QUESTION, "completion": CHOSEN, "label": True},
            {"prompt": QUESTION, "completion": REJECTED, "label": False},
        ],
        [user(QUESTION)],
        [(CHOSEN,), (REJECTED,)],
    ),
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: str(build_family(family, root)) for family in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs):
    return {family: load_tokenizer(path) for family, path in tokenizer_dirs.items()}


def render(tok, messages, **options):
    return tok.apply_chat_template(messages, tokenize=False, **options)


def encode(tok, family, text):
    """The tokenizer's ids for rendered text. SOLAR's BOS comes from the post-processor; Gemma's template
    writes BOS itself (asking for special tokens would add a second); ChatML has none."""
    return tok(text, add_special_tokens=family == "solar")["input_ids"]


def reference_prompt_ids(tok, family, turns):
    return encode(tok, family, render(tok, turns, add_generation_prompt=True))


def reference_ids(tok, family, conversation):
    """The whole rendered conversation's ids, closed by the end-of-turn rule."""
    ids = encode(tok, family, render(tok, conversation))
    if family == "solar":
        return [*ids, tok.eos_token_id]
    marker = tok.convert_tokens_to_ids(LAST_PIECE[family])
    last = len(ids) - 1 - ids[::-1].index(marker)
    assert tok.decode(ids[last + 1 :]) == "\n"  # all that is dropped: the newline after the marker
    return ids[: last + 1]


def load_rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (step,) = load_steps(str(path))
    return step


def answer_rows(out):
    """(prompt ids, [answer ids, ...]) per kept example, pairs or unpaired alike."""
    if out.pairs:
        return [(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in out.pairs]
    return [(e.prompt_ids, [e.completion_ids]) for e in out.unpaired]


def assert_one_bos(tok, family, sequence):
    if family == "chatml":  # Qwen2's convention: no BOS at all
        assert tok.bos_token_id is None
    else:
        assert sequence[0] == tok.bos_token_id and sequence.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("schema", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_and_answer_ids_are_the_whole_rendered_conversation(family, schema, tokenizers, tmp_path):
    tok = tokenizers[family]
    rows, turns, answers = CASES[schema]
    step = load_rows(tmp_path, rows)
    assert step.schema == schema
    out = tokenize_step(step, tok)
    assert out.stats["kept"] == len(rows)
    assert out.stats["boundary_merges"] == 0 and out.stats["template_mismatches"] == 0
    assert out.settings["answer_end"] == ANSWER_END[family]
    prompt = reference_prompt_ids(tok, family, turns)
    for (prompt_ids, answer_ids), texts in zip(answer_rows(out), answers, strict=True):
        assert prompt_ids == prompt
        for ids, text in zip(answer_ids, texts, strict=True):
            assert prompt_ids + ids == reference_ids(tok, family, [*turns, assistant(text)])
            assert_one_bos(tok, family, prompt_ids + ids)
            assert tok.convert_ids_to_tokens(ids)[-1] == LAST_PIECE[family]


def test_sentencepiece_answer_starts_with_the_word_as_the_model_writes_it(tokenizers, tmp_path):
    tok = tokenizers["solar"]
    (pair,) = tokenize_step(load_rows(tmp_path, CASES["standard"][0]), tok).pairs
    assert tok.convert_ids_to_tokens(pair.prompt_ids)[-4:] == ["###", "▁Assistant", ":", "<0x0A>"]
    chosen = tok.convert_ids_to_tokens(pair.chosen_ids)
    assert chosen[:3] == ["Hello", "!", "▁The"] and chosen[-2:] == [".", "</s>"]
    # Encoded on its own, as the answers used to be, the first word carries the word-boundary mark.
    assert tok.convert_ids_to_tokens(tok(CHOSEN, add_special_tokens=False)["input_ids"])[0] == "▁Hello"


def test_answer_is_what_the_template_writes_for_it(tokenizers):
    """Gemma's template trims an assistant message; the trained answer is the trimmed one."""
    tok = tokenizers["gemma"]
    padded = f"  {CHOSEN} \n"
    step = StepData("g", "g", "standard", pairs=[PreferencePair([user(QUESTION)], padded, REJECTED)])
    (pair,) = tokenize_step(step, tok).pairs
    assert pair.prompt_ids + pair.chosen_ids == reference_ids(
        tok, "gemma", [user(QUESTION), assistant(CHOSEN)]
    )
    assert tok.convert_ids_to_tokens(pair.chosen_ids)[0] == "Hello"


SPACE_HEADER_TEMPLATE = SOLAR_TEMPLATE.replace("### Assistant:\\n", "### Assistant: ")


@pytest.mark.parametrize(
    ("family", "template", "answers", "merged_piece"),
    [
        # The generation prompt ends with a space: `▁` at its end, `▁Hello` in the whole conversation.
        ("solar", SPACE_HEADER_TEMPLATE, ("Hello! Paris.", "Hello! Rome."), "▁Hello"),
        # Answers starting with a newline: the prompt's `Ċ` and the answer's merge into `ĊĊ`.
        ("chatml", None, ("\nHello! Paris.", "\nHello! Rome."), "ĊĊ"),
    ],
)
def test_boundary_merge_keeps_shared_prompt_ids_and_is_counted(
    family, template, answers, merged_piece, tokenizer_dirs
):
    tok = load_tokenizer(tokenizer_dirs[family])
    if template is not None:
        tok.chat_template = template
    turns = [user(QUESTION)]
    other = [user("Thanks")]  # a second prompt, so the count covers more than one prompt
    pairs = [PreferencePair(turns, *answers), PreferencePair(other, *answers)]
    out = tokenize_step(StepData("m", "m", "standard", pairs=pairs, n_source_rows=2), tok)
    assert out.stats["boundary_merges"] == 2 and out.stats["kept"] == 2
    for pair, prompt_turns in zip(out.pairs, (turns, other), strict=True):
        prompt = reference_prompt_ids(tok, family, prompt_turns)
        assert pair.prompt_ids == prompt  # chosen and rejected share the prompt ids inference would use
        for ids, text in zip((pair.chosen_ids, pair.rejected_ids), answers, strict=True):
            whole = reference_ids(tok, family, [*prompt_turns, assistant(text)])
            # The whole conversation departs from the prompt ids at the prompt's last token, which merged
            # into the answer's first; the answer is the whole conversation's ids from that token on.
            assert whole[: len(prompt) - 1] == prompt[:-1] and whole[len(prompt) - 1] != prompt[-1]
            assert ids == whole[len(prompt) - 1 :]
            assert tok.convert_ids_to_tokens(ids)[0] == merged_piece


def test_readme_example_is_this_tokenizers_output(tokenizers):
    """README's "How the tokens are built" shows these pieces; keep the two in step."""
    tok = tokenizers["solar"]
    step = StepData(
        "r", "r", "standard", pairs=[PreferencePair([user(QUESTION)], "Hello! Paris.", "Hello! Rome.")]
    )
    (pair,) = tokenize_step(step, tok).pairs
    assert " ".join(tok.convert_ids_to_tokens(pair.prompt_ids)) == (
        "<s> ▁### ▁User : <0x0A> What ▁is ▁the ▁capital ▁of ▁France ? <0x0A> <0x0A> ### ▁Assistant : <0x0A>"
    )
    assert " ".join(tok.convert_ids_to_tokens(pair.chosen_ids)) == "Hello ! ▁Paris . </s>"
