"""The embedded demo model S (`--model tiny`): a few-hundred-thousand-parameter Llama that half knows
addition.

Built locally, deterministically, in seconds: seeded random init, then a short supervised warm-up on the toy
task (the prompts "a+b=" of examples/make_toy_data.py, answers only in the loss), tokenized by the data layer
so the warm-up sees exactly the token layout DPO will. The warm-up stops early on purpose: the model learns
the format (digits, then EOS) and prefers right answers only somewhat, leaving DPO room to improve, and
to show sDPO's point that M_1 is a better reference for step 2 than S.

A second preset, `tiny-carry` (CARRY_RECIPE), is S for the carry toy of lowmem_sdpo.data.carry_task (issue 18's sDPO vs
DPO benchmark): the same shape, warmed up longer on a disjoint split of two-digit sums, so that it ranks right
answers above plausible mistakes on held-out problems clearly above chance, yet far from always. `tiny` keeps
its recipe unchanged: the tests and the demo's tuned claims rest on it.

Weights are stored in fp32 (CPU math stays exact; export still writes bf16). The result is cached under
$LOWMEM_SDPO_CACHE (or ~/.cache/lowmem-sdpo) as <preset>-<recipe hash>, written through an atomic directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
    carry_task,
    collate_pairs,
    load_tokenizer,
    tokenize_step,
)
from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir
from lowmem_sdpo.hf_progress import hf_bars_off

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


SPLIT_BEFORE_STEPS = ("heldout", "validation", "warmup")

# The carry toy's S. Shape as `tiny` (a wider or deeper model learned no better in the CPU budget: 256 x 4 layers
# trained ~4x slower per step); the split seed and sizes must match the benchmark's (lowmem_sdpo.data.carry_task).
# lr_warmup_steps + cosine: a linear ramp, then a cosine decay to 0. At a constant lr 3e-3 the warm-up's held-out
# ranking swung between 0.59 and 0.73 from one checkpoint to the next (validation split, fp32); the decay lets it
# settle where it ends. 700 steps: on the validation split (fp32) the ranking ends at 0.73 (900: 0.78; 1500 groks
# addition outright, 0.97 at step 1300, leaving DPO nothing to show), clearly above chance, well short of the top.
CARRY_RECIPE: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    "task": "carry",
    "architecture": dict(TINY_RECIPE["architecture"]),
    # The warm-up split depends on these three sizes only (the steps are drawn after it).
    "corpus": {
        "split_seed": carry_task.SPLIT_SEED,
        **{k: carry_task.SPLIT_SIZES[k] for k in SPLIT_BEFORE_STEPS},
    },
    "warmup": {
        "steps": 1000,
        "batch_size": 32,
        "lr": 3e-3,
        "weight_decay": 0.0,
        "lr_warmup_steps": 50,
        "cosine": True,
    },
}

# Preset name -> recipe; the name is the cache directory's prefix and the model alias.
PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY_RECIPE, "tiny-carry": CARRY_RECIPE}


def preset_name(recipe: dict[str, Any]) -> str:
    return "tiny-carry" if recipe.get("task") == "carry" else "tiny"


def default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lowmem-sdpo"


def recipe_hash(recipe: dict[str, Any] | None = None) -> str:
    """Covers the recipe and the bundled tokenizer's files: either changing means a different model."""
    digest = hashlib.sha256(json.dumps(TINY_RECIPE if recipe is None else recipe, sort_keys=True).encode())
    for path in sorted(bundled_tokenizer_dir().glob("*.json")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tiny_model_dir(cache_dir: Path | None = None, recipe: dict[str, Any] | None = None) -> Path:
    recipe = TINY_RECIPE if recipe is None else recipe
    return Path(cache_dir or default_cache_root()) / f"{preset_name(recipe)}-{recipe_hash(recipe)}"


def warmup_problems(seed: int, two_digit: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    easy = [(a, b) for a in range(10) for b in range(10)]
    hard = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], two_digit)
    return easy + hard


def recipe_problems(recipe: dict[str, Any]) -> list[tuple[int, int]]:
    corpus = recipe["corpus"]
    if recipe.get("task") == "carry":
        sizes = {k: corpus[k] for k in SPLIT_BEFORE_STEPS}
        return carry_task.split_problems(corpus["split_seed"], **sizes, step1=0, step2=0).warmup
    return warmup_problems(recipe["seed"], corpus["two_digit_problems"])


def warmup_pairs(tokenizer: Any, problems: list[tuple[int, int]]) -> list[TokenizedPair]:
    """The corpus as the data layer tokenizes it. Pairs because that is the layout DPO sees; only the
    chosen (right) answer is trained on, the rejected one is a placeholder the warm-up never reads."""
    pairs = [
        PreferencePair(prompt=[{"role": "user", "content": f"{a}+{b}="}], chosen=str(a + b), rejected="?")
        for a, b in problems
    ]
    step = StepData(
        label="tiny-warmup", source="builtin", schema="standard", pairs=pairs, n_source_rows=len(pairs)
    )
    return tokenize_step(step, tokenizer, max_length=64, max_prompt_length=48).pairs


def _llama_config(tokenizer: Any, recipe: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe["architecture"],
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


def train_tiny(tokenizer: Any, recipe: dict[str, Any] | None = None) -> tuple[Any, dict[str, float]]:
    """Seeded init + supervised warm-up on chosen answers. Returns the model and a few build numbers."""
    from transformers import LlamaForCausalLM

    recipe = TINY_RECIPE if recipe is None else recipe
    seed = recipe["seed"]
    warm = recipe["warmup"]
    pairs = warmup_pairs(tokenizer, recipe_problems(recipe))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_llama_config(tokenizer, recipe)).to(torch.float32)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warm["lr"], weight_decay=warm["weight_decay"])
    ramp, steps = warm.get("lr_warmup_steps", 0), warm["steps"]

    def lr_factor(s: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * s / steps)) if warm.get("cosine") else 1.0
        return min(1.0, (s + 1) / ramp) * decay

    # Only a recipe that asks for a schedule gets one: `tiny`'s warm-up stays exactly as it was built.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor) if ramp else None
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
        if scheduler is not None:
            scheduler.step()
        first = out.loss.item() if step == 0 else first
        last = out.loss.item()
    model.eval()
    return model, {"first_loss": first, "last_loss": last}


def build_tiny_model(
    cache_dir: Path | None = None, *, force: bool = False, recipe: dict[str, Any] | None = None
) -> Path:
    """The tiny model's directory (config.json, model.safetensors, tokenizer files); built if not cached.
    `recipe`: TINY_RECIPE (default) or another of PRESETS."""
    recipe = TINY_RECIPE if recipe is None else recipe
    out = tiny_model_dir(cache_dir, recipe)
    if not force and (out / RECIPE_FILE).is_file():
        return out
    started = time.perf_counter()
    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    with single_thread():
        model, numbers = train_tiny(tokenizer, recipe)
    with atomic_dir(out) as tmp:
        with hf_bars_off():  # a bar for a one-shard save is noise on the terminal of whichever command built it
            model.save_pretrained(tmp)
        for path in bundled_tokenizer_dir().glob("*.json"):
            shutil.copyfile(path, tmp / path.name)
        record = {
            "recipe": recipe,
            "recipe_hash": recipe_hash(recipe),
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.perf_counter() - started, 2),
            **numbers,
        }
        # Written last: its presence marks a complete build (the directory appears only on rename anyway).
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out
