"""The run's settings: one dataclass, its documented defaults, a YAML file under the flags.

Precedence: defaults < `--config FILE` (YAML, keys as the field names, `-` or `_`) < flags given on the line.
Defaults follow the alignment-handbook's Zephyr QLoRA DPO recipe that the sDPO paper builds on (cosine
schedule, 10% warm-up, one epoch, 4 x 4 effective batch, LoRA r=16/alpha=16/dropout 0.05 on every block
linear, max length 1024 / prompt 512), with the DPO beta of 0.1 the issue and Zephyr-7B-beta use and the
QLoRA recipe's learning rate 5e-6.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lowmem_sdpo.checks import check_number, check_type
from lowmem_sdpo.errors import InputError


@dataclass
class RunConfig:
    model: str = ""
    revision: str | None = None  # hub branch, tag or commit of --model (pinned in run.json either way)
    steps: str = ""
    output_dir: str = ""
    columns: str | None = None
    desirable_threshold: float = 3.0
    seed: int = 0
    # tokenization
    max_length: int = 1024
    max_prompt_length: int = 512
    # objective
    loss: str = "sigmoid"
    beta: float = 0.1
    loss_options: dict[str, Any] = field(default_factory=dict)
    # optimisation
    learning_rate: float = 5e-6
    epochs: float = 1.0
    batch_size: int = 4  # pairs per micro-batch (2x sequences in one forward)
    reference_batch_size: int = 0  # units per no-grad reference forward; 0: auto, 2 x batch_size
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "auto"  # auto: adamw_8bit on CUDA (fused torch AdamW without bitsandbytes), adamw on CPU
    gradient_checkpointing: bool = True
    # LoRA target
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # lanes: CPU dropout masks from 64-bit random words (3.5x cheaper than torch's; p rounded to a multiple of
    # 2^-16); torch: peft's nn.Dropout. See models/lora_dropout.py.
    lora_dropout_impl: str = "lanes"
    target_init: str = (
        "previous"  # "previous": LoRA on M_{t-1} (sDPO); "base": on S (the paper's Fig. 3 ablation)
    )
    # M_{t-1} materialisation
    # exact: Q(S) + the finished steps' adapters as one frozen low-rank delta (M_{t-1} exactly as trained);
    # requantized: quantise(S + sum dW) per step (--merge picks how), with reference_drift reported.
    reference: str = "exact"
    merge: str = "exact"
    compute_dtype: str = "auto"  # auto: bfloat16 on cards with it, else float16; float32 on CPU
    double_quant: bool = True
    logprob_impl: str = "auto"
    # Bit-identical gradients run to run (and so a resumed run equal to an uninterrupted one on GPU too): the
    # fused log-prob op's ordered torch implementation instead of the Triton kernels, whose backward adds
    # tiles with atomics in a varying order (README "Fused log-prob kernels").
    deterministic: bool = False
    device: str = "auto"
    # CPU runs: fix glibc malloc's mmap threshold so freed activations go back to the system (runtime/cpu_heap.py):
    # 3x less peak RSS on SmolLM2-135M, for 20-50% more CPU time per step (page faults); off: glibc's default.
    bound_cpu_heap: bool = True
    # held-out evaluation (engine/reference/heldout.py)
    eval_split: float = 0.0  # a seeded fraction of each step's data kept out of training; 0: none
    eval_steps: str = ""  # or held-out data in the --steps grammar: one item for every step, or one per step
    eval_every: int = 0  # also every N optimiser steps (0: only at the end of each step)
    # bookkeeping
    report_to: str = "none"  # a tracker of lowmem_sdpo.trackers.TRACKERS, fed metrics.jsonl's rows
    save_every: int = 50
    diagnostics: bool = False
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Keys that may differ between a run and its --resume without changing what it computes.
# reference_batch_size is NOT exempt: it decides which units share a forward, hence the padded width and
# the row count of every matmul, and BLAS / cuBLAS pick their kernels (blocking, split-K) by shape, so the
# reference log-probs of a step not yet cached may change in the last bits; resume promises the adapters
# of an uninterrupted run exactly (right padding and the causal mask keep the valid positions' values
# the same only up to that rounding).
RESUME_EXEMPT = frozenset({"save_every", "quiet", "output_dir", "diagnostics", "report_to", "bound_cpu_heap"})
# Options added with a default that differs from what runs made before them did: a run.json without the key
# ran this way.
ABSENT_MEANS: dict[str, Any] = {"lora_dropout_impl": "torch"}
CHOICES: dict[str, tuple[str, ...]] = {
    "target_init": ("previous", "base"),
    "reference": ("exact", "requantized"),
    "compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    # The names of engine.training.optim.OPTIMIZERS (kept literal here so that parsing a config needs no torch import).
    "optim": ("auto", "adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"),
    "device": ("auto", "cpu", "cuda"),
    # The names of models.lora_dropout.DROPOUT_IMPLS (literal for the same reason).
    "lora_dropout_impl": ("lanes", "torch"),
    # The names of trackers.TRACKERS (literal for the same reason).
    "report_to": ("none", "tensorboard", "wandb", "trackio"),
}
POSITIVE: tuple[str, ...] = (
    "lora_alpha",
    "max_length",
    "max_prompt_length",
    "batch_size",
    "grad_accum",
    "lora_r",
    "save_every",
)
# Integer options where 0 means "auto" (worked out from other options) and negatives are refused.
NON_NEGATIVE: tuple[str, ...] = ("reference_batch_size", "eval_every")
# reference_batch_size 0: the no-grad reference pass keeps no activations for backward, so twice the
# training micro-batch fits where training fits.
AUTO_REFERENCE_BATCH_FACTOR = 2


def reference_batch_size(config: RunConfig) -> int:
    """Units per forward of the reference pass: --reference-batch-size, or 2 x --batch-size when it is 0."""
    return config.reference_batch_size or AUTO_REFERENCE_BATCH_FACTOR * config.batch_size


# Units of D_t on which the reference's drift from P_{t-1} and the step's own training shift are measured (a
# fixed size, not an option; here, torch-free, because `plan` sizes that pass too).
DRIFT_SAMPLE = 64


def field_names() -> list[str]:
    return [f.name for f in fields(RunConfig)]


def read_config_file(path: str | Path, extra_keys: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """YAML (or JSON, a YAML subset) mapping of RunConfig fields (and `extra_keys`, the loss options);
    unknown keys are an error, not ignored: a typo must not silently run with a default."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    known = set(field_names()) | set(extra_keys)
    defaults = RunConfig()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InputError(f"--config {path}: unknown option '{key}' (known: {', '.join(sorted(known))})")
        default = getattr(defaults, name, None)
        if isinstance(default, float) and isinstance(value, str):
            # YAML 1.1 reads 5e-6 (no dot) as a string; a number written that way is still a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if hasattr(defaults, name):  # a RunConfig field (loss options are checked by their own specs)
            check_type(f"--config {path}: {key}", value, default)
        out[name] = value
    return out


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """defaults < file < flags (flags whose value is None were not given); no --output-dir means
    `default_output_dir(model, steps)`, so a rerun or --resume with the same flags finds the same directory."""
    values = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    config = RunConfig(**values)
    if not config.output_dir and config.model and config.steps:
        config.output_dir = default_output_dir(config.model, config.steps)
    validate(config)
    return config


RUNS_ROOT = "runs"
SLUG_MAX = 80  # characters of the directory name; longer ones are cut and end in a hash of the whole
DATA_EXTENSION = re.compile(r"\.(jsonl|json|parquet|csv)(?=$|[:@])", re.IGNORECASE)
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug_part(text: str, strip_extension: bool) -> str:
    """The last path component (drops a local path's directories and a hub id's organisation), its data
    file extension dropped, and every run of characters outside [A-Za-z0-9._-] made one '_'."""
    name = text.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if strip_extension:
        name = DATA_EXTENSION.sub("", name)
    return UNSAFE.sub("_", name).strip("_.") or "x"


def default_output_dir(model: str, steps: str) -> str:
    """runs/<model>-<step>-<step>...: e.g. `tiny` with `a/toy_step1.jsonl,b/toy_step2.jsonl` gives
    runs/tiny-toy_step1-toy_step2. Deterministic, filesystem-safe, at most SLUG_MAX characters."""
    parts = [_slug_part(model, strip_extension=False)]
    parts += [_slug_part(item, strip_extension=True) for item in steps.split(",") if item.strip()]
    slug = "-".join(parts)
    if len(slug) > SLUG_MAX:
        # Cut, but keep different long inputs apart: the tail is a digest of the full model and steps.
        digest = hashlib.sha256(f"{model}\n{steps}".encode()).hexdigest()[:8]
        slug = f"{slug[: SLUG_MAX - 9].rstrip('-_.')}-{digest}"
    return f"{RUNS_ROOT}/{slug}"


# Ranges of the float options: (low, high, low_open, high_open, note); None is unbounded. Every float is also
# refused when NaN or infinite (a NaN passes any `x <= 0` test and would reach the optimiser).
FLOAT_RANGES: dict[str, tuple[float | None, float | None, bool, bool, str]] = {
    "beta": (0.0, None, True, False, ""),
    "learning_rate": (0.0, None, True, False, ""),
    "epochs": (0.0, None, True, False, ""),
    "warmup_ratio": (0.0, 1.0, False, True, ""),
    "weight_decay": (0.0, None, False, False, ""),
    "max_grad_norm": (0.0, None, True, False, ""),
    "lora_dropout": (0.0, 1.0, False, True, ""),
    "eval_split": (0.0, 1.0, False, True, " (0: no held-out split)"),
    "desirable_threshold": (None, None, False, False, ""),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_prompt_length(max_length: Any, default: int = RunConfig.max_prompt_length) -> int | None:
    """--max-prompt-length where neither the flags nor a --config file or recipe give it (run, sft, self-reward,
    data inspect): the command's default, or half of --max-length where that is smaller, so that `--max-length
    256` alone is a valid line (the answer keeps tokens of its own; validate refuses a prompt limit at or over
    it). None (the command's default stands) where --max-length is not given, or is no integer, which the
    config's own checks then refuse."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        return None
    return min(default, max_length // 2)


def validate(config: RunConfig) -> None:
    """Every field of the right type and in range, before anything is loaded: a config file's
    `epochs: "lots"` or a flag's `nan` is one line here, not a traceback (or a NaN in run.json) later."""
    defaults = RunConfig()
    for f in fields(RunConfig):
        check_type(_flag(f.name), getattr(config, f.name), getattr(defaults, f.name))
    if not config.model:
        raise InputError("--model is required (a hub id, a local directory, or an alias such as 'tiny')")
    if not config.steps:
        raise InputError("--steps is required (comma-separated step items, e.g. openorca,ultrafeedback)")
    if not config.output_dir:  # the CLI fills in default_output_dir; direct callers must name one
        raise InputError("--output-dir is required (the run directory, e.g. runs/NAME)")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise InputError(f"{_flag(name)} {getattr(config, name)!r}: expected one of {', '.join(choices)}")
    for name in POSITIVE:
        check_number(_flag(name), getattr(config, name), low=1, integer=True)
    for name in NON_NEGATIVE:
        check_number(_flag(name), getattr(config, name), low=0, integer=True, note=" (0: auto)")
    for name, (low, high, low_open, high_open, note) in FLOAT_RANGES.items():
        check_number(_flag(name), getattr(config, name), low=low, high=high, low_open=low_open, high_open=high_open, note=note)
    if config.max_prompt_length >= config.max_length:
        raise InputError(
            f"--max-prompt-length {config.max_prompt_length} must be less than --max-length {config.max_length} "
            "(the answer needs tokens of its own)"
        )
    _validate_heldout(config)


def _validate_heldout(config: RunConfig) -> None:
    if config.eval_split and config.eval_steps:
        raise InputError("--eval-split and --eval-steps: give one source of held-out pairs, not both")
    if config.eval_every and not (config.eval_split or config.eval_steps):
        raise InputError("--eval-every needs held-out pairs: add --eval-split F or --eval-steps SPEC")


def resume_differences(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """The option names whose values differ between run.json's config and this invocation."""
    now = current.to_dict()
    # A key the saved run lacks is an option added since it started: it ran with that option's default, or with
    # what the code did before the option existed where that differs (ABSENT_MEANS).
    defaults = RunConfig().to_dict()
    was = {**defaults, **ABSENT_MEANS, **saved}
    keys = sorted(set(was) | set(now))
    return [k for k in keys if k not in RESUME_EXEMPT and was.get(k) != now.get(k)]
