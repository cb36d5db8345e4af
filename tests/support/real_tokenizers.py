"""Offline stand-ins for three real tokenizer families, for tests that need real-world tokenization.

Each is trained with the `tokenizers` library on the small corpus below, handed as vocabulary + merges to the
transformers class its family loads with (LlamaTokenizer, Qwen2Tokenizer, GemmaTokenizer: those classes set
the pipeline real checkpoints get, e.g. Llama's Metaspace pre-tokenizer with prepend_scheme "first" and byte
fallback), written with save_pretrained, and meant to be read back through lowmem_sdpo.data.load_tokenizer
(AutoTokenizer.from_pretrained, the real load path).

- "solar": SentencePiece-style Llama BPE, byte fallback (a newline is `<0x0A>`), BOS `<s>` added by the
  post-processor, EOS `</s>`, SOLAR-10.7B-Instruct's chat template (writes nothing after an answer).
- "chatml": byte-level BPE in Qwen2's convention: no BOS, EOS `<|im_end|>`, pad `<|endoftext|>`, ChatML.
- "gemma": SentencePiece-style BPE without a dummy prefix, `<start_of_turn>` / `<end_of_turn>`, a template
  that writes `{{ bos_token }}` itself while the post-processor would add BOS too (Gemma's double-BOS trap).

Training corpora are tiny, so nearly every corpus word becomes one token: sequences stay short and readable.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

# Words the tests' conversations use, in the layouts the templates write them (turn headers included), so
# the trained vocabularies hold them whole. Lines holding "\n" teach the SentencePiece-style vocabularies
# the words that follow a newline without a word-boundary mark (`Hello` beside `▁Hello`).
CORPUS: tuple[str, ...] = (
    "### System:\nBe brief.\n\n### User:\nWhat is the capital of France?\n\n### Assistant:\nHello! Paris.",
    "### User:\nAnd of Italy?\n\n### Assistant:\nHello! The capital of Italy is Rome.",
    "### User:\nThanks\n\n### Assistant:\nHello! It is Rome. You are welcome.",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital?<|im_end|>\n",
    "<|im_start|>assistant\nHello! The capital of France is Paris.<|im_end|>\n\n",
    "<start_of_turn>user\nWhat is the capital of Italy?<end_of_turn>\n<start_of_turn>model\nHello! Rome.",
    "Hello world. The answer is Paris, not Rome. Thanks, you are welcome.",
)

SOLAR_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{% if message['content']%}"
    "{{'### System:\\n' + message['content']+'\\n\\n'}}{% endif %}{% elif message['role'] == 'user' %}"
    "{{'### User:\\n' + message['content']+'\\n\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'### Assistant:\\n'  + message['content']}}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma has no system role: a system message is folded into the first user turn. Contents are trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set prefix = system if loop.first else '' %}"
    "{{ '<start_of_turn>' + role + '\\n' + prefix + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

FAMILIES: tuple[str, ...] = ("solar", "chatml", "gemma")

# Kept whole while training; a vocabulary holds one only as the special token its family defines.
TEMPLATE_MARKERS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")

BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece's byte fallback


def train_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, **trainer_options) -> tuple[dict, list]:
    """(vocab, merges) of a BPE trained on CORPUS; the vocabulary is large enough to keep words whole."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=5000, show_progress=False, **trainer_options)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def sentencepiece_vocab(
    specials: tuple[str, ...], *, prepend_scheme: str, keep_newline: bool
) -> tuple[dict, list]:
    """Special tokens, the 256 byte-fallback tokens, then the trained pieces (SentencePiece's id layout).

    Training splits at newlines and punctuation so no piece spans them, as SentencePiece's whitespace and
    script splitting would; without keep_newline a newline is no piece at all and encodes as `<0x0A>`.
    """
    newline = pre_tokenizers.Split("\n", "isolated" if keep_newline else "removed")
    splitter = pre_tokenizers.Sequence(
        [
            newline,
            pre_tokenizers.Punctuation("contiguous"),
            pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme),
        ]
    )
    trained, merges = train_bpe(splitter, special_tokens=list(TEMPLATE_MARKERS))
    vocab = {token: i for i, token in enumerate((*specials, *BYTE_TOKENS))}
    for piece in trained:
        if piece not in TEMPLATE_MARKERS:
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def build_solar(directory: Path) -> Path:
    from transformers import LlamaTokenizer

    vocab, merges = sentencepiece_vocab(("<unk>", "<s>", "</s>"), prepend_scheme="first", keep_newline=False)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tok.chat_template = SOLAR_TEMPLATE
    tok.save_pretrained(directory)
    return directory


def build_chatml(directory: Path) -> Path:
    from transformers import Qwen2Tokenizer

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trained, merges = train_bpe(
        splitter, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(TEMPLATE_MARKERS)
    )
    vocab = {piece: i for i, piece in enumerate(p for p in trained if p not in TEMPLATE_MARKERS)}
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})  # Qwen2 puts them last
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(directory)
    return directory


def build_gemma(directory: Path) -> Path:
    from transformers import GemmaTokenizer

    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
    vocab, merges = sentencepiece_vocab(specials, prepend_scheme="never", keep_newline=True)
    tok = GemmaTokenizer(
        vocab=vocab, merges=merges, extra_special_tokens=list(specials[5:]), add_bos_token=True
    )
    tok.chat_template = GEMMA_TEMPLATE
    tok.save_pretrained(directory)
    return directory


BUILDERS = {"solar": build_solar, "chatml": build_chatml, "gemma": build_gemma}


def build_family(name: str, root: Path) -> Path:
    """Write the family's tokenizer files under root/name and return that directory."""
    return BUILDERS[name](Path(root) / name)
