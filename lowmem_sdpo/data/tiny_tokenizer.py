"""The bundled tiny tokenizer (lowmem_sdpo/assets/tiny/): built here, deterministically, with no download.

Character-level: every printable ASCII character plus newline is one token, so any toy prompt round-trips.
The three SOLAR-style turn headers (`### System:\\n`, `### User:\\n`, `### Assistant:\\n`) are single added
tokens, which keeps the demo's sequences short (a templated toy prompt is ~10 tokens, not ~30).

Regenerate the committed files with `python -m lowmem_sdpo.data.tiny_tokenizer` (or
examples/make_tiny_tokenizer.py); tests check the committed files equal a fresh build.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, processors

from lowmem_sdpo.atomic import atomic_dir

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
TURN_HEADERS: tuple[str, ...] = ("### System:\n", "### User:\n", "### Assistant:\n")

# SOLAR-10.7B-Instruct's layout. The system turn is skipped when empty; earlier assistant turns end with a
# blank line like every other turn. BOS is not in the template: the tokenizer's post-processor adds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

# Every printable ASCII character except the whitespace controls (\t \r \x0b \x0c), plus newline.
CHARACTERS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    # BPE without merges = one token per character; unknown characters become <unk>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tok.decoder = decoders.Fuse()  # concatenate tokens, no spaces in between
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TURN_HEADERS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}


def render_files() -> dict[str, str]:
    """File name -> exact text, so a build is byte-for-byte reproducible."""
    return {
        "tokenizer.json": build_tokenizer().to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens_map(), indent=2, sort_keys=True) + "\n",
    }


def write_tiny_tokenizer(directory: str | Path) -> Path:
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        for name, text in render_files().items():
            (tmp / name).write_text(text)
    return directory


def bundled_tokenizer_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "tiny"


if __name__ == "__main__":
    print(write_tiny_tokenizer(bundled_tokenizer_dir()))
