"""Each shape's model (a seeded random Llama written with save_pretrained, or a real model's alias) and its two
steps of data (seeded pairs of exact token lengths, or real-language pairs), with the token counts of each step."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import REPO, device_label

from .settings import PROMPT_SHARE, SEED, Shape


def build_model_dir(shape: Shape, cache: Path, device: str) -> Path:
    """The shape's random Llama (seeded), written once with save_pretrained in bf16 with the bundled
    tokenizer; reused while its directory holds complete.json. A real model's shape: its alias, resolved (and
    built on first use) as any lowmem-sdpo run resolves it."""
    if shape.alias is not None:
        from lowmem_sdpo.models import resolve_model

        return resolve_model(shape.alias)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_sdpo.data.tiny_tokenizer import bundled_tokenizer_dir

    target = cache / f"{shape.model_key()}-seed{SEED}"
    if (target / "complete.json").is_file():
        return target
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    tmp = cache / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    previous = torch.get_default_dtype()
    torch.manual_seed(SEED)
    if device == "cuda":
        torch.cuda.manual_seed_all(SEED)
    try:
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 10.7B parameters are 21 GB, not 43
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(tmp, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    for file in bundled_tokenizer_dir().glob("*.json"):
        shutil.copyfile(file, tmp / file.name)
    (tmp / "complete.json").write_text(json.dumps({"shape": asdict(shape), "seed": SEED}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


WORDS_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def random_text(rng: random.Random, n_chars: int) -> str:
    """n_chars characters of lowercase words and single spaces (one token per character with the bundled
    tokenizer), not starting or ending with a space."""
    out: list[str] = []
    while len(out) < n_chars:
        if out and out[-1] != " " and rng.random() < 0.18 and len(out) < n_chars - 1:
            out.append(" ")
        else:
            out.append(rng.choice(WORDS_ALPHABET))
    return "".join(out)


def write_pairs(path: Path, shape: Shape, seed: int) -> None:
    """Pairs whose chosen sequence is exactly seq_len tokens and whose rejected one is up to seq_len/16 shorter,
    with the bundled tokenizer and chat template: prompt = BOS + '### User:\\n' + text + '\\n\\n' +
    '### Assistant:\\n' (text + 5 tokens), answer = text + EOS (text + 1)."""
    rng = random.Random(f"bench_e2e-{seed}")
    prompt_tokens = int(shape.seq_len * PROMPT_SHARE)
    prompt_chars = prompt_tokens - 5
    chosen_chars = shape.seq_len - prompt_tokens - 1
    rows = []
    for _ in range(shape.pairs):
        rejected_chars = chosen_chars - rng.randint(0, max(1, shape.seq_len // 16))
        rows.append(
            {
                "prompt": random_text(rng, prompt_chars),
                "chosen": random_text(rng, chosen_chars),
                "rejected": random_text(rng, rejected_chars),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


CHAT_PAIRS = REPO / "examples" / "data" / "chat_pairs.jsonl"
# Of seq_len: the longer side of a real-language pair stays under it (issue 28's pairs: 410-430 tokens of 512).
REAL_FILL = 0.84


def write_chat_pairs(path: Path, shape: Shape, seed: int, model_dir: Path) -> None:
    """Real-language pairs of about REAL_FILL * seq_len tokens a side: each prompt asks a seeded draw of the
    bundled chat pairs' questions as a numbered list, chosen answers them with their chosen answers, rejected
    with their rejected ones. Items are added while the prompt (rendered by the model's chat template, as both
    systems render it) stays under half of seq_len and the longer side under REAL_FILL * seq_len."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    items = [json.loads(line) for line in CHAT_PAIRS.read_text().splitlines() if line.strip()]
    rng = random.Random(f"bench_e2e-chat-{seed}")

    def n_prompt(text: str) -> int:
        return len(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))  # fmt: skip

    def n_text(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the end-of-turn token

    rows = []
    for _ in range(shape.pairs):
        order = rng.sample(items, len(items))
        questions: list[str] = []
        chosen: list[str] = []
        rejected: list[str] = []
        for item in order:
            k = len(questions) + 1
            q = [*questions, f"{k}. {item['prompt'][-1]['content']}"]
            c = [*chosen, f"{k}. {item['chosen'][-1]['content']}"]
            r = [*rejected, f"{k}. {item['rejected'][-1]['content']}"]
            prompt = "Answer each question in one sentence.\n" + "\n".join(q)
            p = n_prompt(prompt)
            longer = p + max(n_text("\n".join(c)), n_text("\n".join(r)))
            if p > shape.seq_len // 2 or longer > REAL_FILL * shape.seq_len:
                break
            questions, chosen, rejected = q, c, r
        rows.append({"prompt": "Answer each question in one sentence.\n" + "\n".join(questions),
                     "chosen": "\n".join(chosen), "rejected": "\n".join(rejected)})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def count_tokens(model_dir: Path, data: list[Path], shape: Shape) -> list[dict[str, Any]]:
    """Per step, as lowmem-sdpo tokenizes it: T (the rule in the module docstring) and what was cut."""
    from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step

    tokenizer = load_tokenizer(str(model_dir))
    steps = load_steps(",".join(str(p) for p in data), seed=SEED)
    out = []
    for step in steps:
        tok = tokenize_step(step, tokenizer, max_length=shape.seq_len, max_prompt_length=shape.seq_len // 2)
        t = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tok.pairs)
        out.append(
            {
                "pairs": len(tok.pairs),
                "tokens": t,
                "longest": tok.stats["longest_sequence"],
                "truncated": tok.stats["truncated"],
                "dropped": tok.stats["dropped"],
            }
        )
    return out



def prepare_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Model (cached), data and token counts for one shape; versions of this interpreter."""
    import torch
    import transformers

    shape = Shape(**spec["shape"])
    device = spec["device"]
    started = time.perf_counter()
    model_dir = build_model_dir(shape, Path(spec["cache"]), device)
    built_s = time.perf_counter() - started
    data_dir = Path(spec["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    data = [data_dir / f"step{t}.jsonl" for t in (1, 2)]
    for t, path in enumerate(data, start=1):
        if shape.alias is not None:
            write_chat_pairs(path, shape, seed=1000 * t + SEED, model_dir=model_dir)
        else:
            write_pairs(path, shape, seed=1000 * t + SEED)
    steps = count_tokens(model_dir, data, shape)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "bitsandbytes", "trl", "liger_kernel", "accelerate"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
    return {
        "model_dir": str(model_dir),
        "data": [str(p) for p in data],
        "steps": steps,
        "model_seconds": built_s,
        "versions": versions,
        "device": device_label(device),
    }
