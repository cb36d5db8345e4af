"""The embedded demo model S (`--model tiny`): a few-hundred-thousand-parameter Llama that half knows
addition.

Built locally, deterministically, in seconds: seeded random init, then a short supervised warm-up on the toy
task (the prompts "a+b=" of examples/make_toy_data.py, answers only in the loss), tokenized by the data layer
so the warm-up sees exactly the token layout DPO will. The warm-up stops early on purpose: the model learns
the format (digits, then EOS) and prefers right answers only somewhat, leaving DPO room to improve, and
to show sDPO's point that M_1 is a better reference for step 2 than S.

Weights are stored in fp32 (CPU math stays exact; export still writes bf16). The result is cached under
$LOWMEM_SDPO_CACHE (or ~/.cache/lowmem-sdpo) as tiny-<recipe hash>, written through an atomic directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.atomic import atomic_dir
from lowmem_sdpo.data import (
    PreferencePair,
    StepData,
    TokenizedPair,
    collate_pairs,
    load_tokenizer,
    tokenize_step,
)
from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir

RECIPE_FILE = "tiny_recipe.json"
CACHE_ENV = "LOWMEM_SDPO_CACHE"

# Bump "version" whenever the build code changes in a way the numbers below do not show.
TINY_RECIPE: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    # Dimensions are multiples of 64, bitsandbytes' NF4 block size; untied lm_head like SOLAR.
    "architecture": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    # Warm-up corpus: every single-digit sum and a sample of two-digit sums, like the toy steps.
    "corpus": {"two_digit_problems": 400},
    "warmup": {"steps": 120, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.0},
}


def default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lowmem-sdpo"


def recipe_hash() -> str:
    """Covers the recipe and the bundled tokenizer's files: either changing means a different model."""
    digest = hashlib.sha256(json.dumps(TINY_RECIPE, sort_keys=True).encode())
    for path in sorted(bundled_tokenizer_dir().glob("*.json")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_root()) / f"tiny-{recipe_hash()}"


def warmup_problems(seed: int, two_digit: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    easy = [(a, b) for a in range(10) for b in range(10)]
    hard = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], two_digit)
    return easy + hard


def warmup_pairs(tokenizer: Any, seed: int, two_digit: int) -> list[TokenizedPair]:
    """The corpus as the data layer tokenizes it. Pairs because that is the layout DPO sees; only the
    chosen (right) answer is trained on, the rejected one is a placeholder the warm-up never reads."""
    pairs = [
        PreferencePair(prompt=[{"role": "user", "content": f"{a}+{b}="}], chosen=str(a + b), rejected="?")
        for a, b in warmup_problems(seed, two_digit)
    ]
    step = StepData(
        label="tiny-warmup", source="builtin", schema="standard", pairs=pairs, n_source_rows=len(pairs)
    )
    return tokenize_step(step, tokenizer, max_length=64, max_prompt_length=48).pairs


def _llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_RECIPE["architecture"],
    )


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one CPU thread for the build, then the caller's setting back.

    Why: the same recipe must give the same weights on every machine (the cache key is the recipe hash), and
    a float reduction split over a different number of threads rounds differently. The matrices here are so
    small that more threads barely help, and on a busy machine they make it several times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny(tokenizer: Any) -> tuple[Any, dict[str, float]]:
    """Seeded init + supervised warm-up on chosen answers. Returns the model and a few build numbers."""
    from transformers import LlamaForCausalLM

    seed = TINY_RECIPE["seed"]
    warm = TINY_RECIPE["warmup"]
    pairs = warmup_pairs(tokenizer, seed, TINY_RECIPE["corpus"]["two_digit_problems"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_llama_config(tokenizer)).to(torch.float32)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warm["lr"], weight_decay=warm["weight_decay"])
    model.train()
    first = last = float("nan")
    for step in range(warm["steps"]):
        picks = torch.randint(len(pairs), (warm["batch_size"],), generator=order).tolist()
        batch = collate_pairs([pairs[i] for i in picks], tokenizer.pad_token_id)
        rows = warm["batch_size"]  # rows 0..B-1 hold the chosen answers; the rejected half is skipped
        out = model(
            input_ids=batch["input_ids"][:rows],
            attention_mask=batch["attention_mask"][:rows],
            labels=batch["labels"][:rows],
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = out.loss.item() if step == 0 else first
        last = out.loss.item()
    model.eval()
    return model, {"first_loss": first, "last_loss": last}


def build_tiny_model(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """The tiny model's directory (config.json, model.safetensors, tokenizer files); built if not cached."""
    out = tiny_model_dir(cache_dir)
    if not force and (out / RECIPE_FILE).is_file():
        return out
    started = time.perf_counter()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    with single_thread():
        model, numbers = train_tiny(tokenizer)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        for path in bundled_tokenizer_dir().glob("*.json"):
            shutil.copyfile(path, tmp / path.name)
        record = {
            "recipe": TINY_RECIPE,
            "recipe_hash": recipe_hash(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.perf_counter() - started, 2),
            **numbers,
        }
        # Written last: its presence marks a complete build (the directory appears only on rename anyway).
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out
