"""The run's settings: one dataclass, its documented defaults, a YAML file under the flags.

Precedence: defaults < `--config FILE` (YAML, keys as the field names, `-` or `_`) < flags given on the line.
Defaults follow the alignment-handbook's Zephyr QLoRA DPO recipe that the sDPO paper builds on (cosine
schedule, 10% warm-up, one epoch, 4 x 4 effective batch, LoRA r=16/alpha=16/dropout 0.05 on every block
linear, max length 1024 / prompt 512), with the DPO beta of 0.1 the issue and Zephyr-7B-beta use and the
QLoRA recipe's learning rate 5e-6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

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
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "auto"  # auto: paged_adamw_8bit on CUDA, adamw on CPU
    gradient_checkpointing: bool = True
    # LoRA target
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_init: str = (
        "previous"  # "previous": LoRA on M_{t-1} (sDPO); "base": on S (the paper's Fig. 3 ablation)
    )
    # M_{t-1} materialisation
    # exact: Q(S) + the finished steps' adapters as one frozen low-rank delta (M_{t-1} exactly as trained);
    # requantized: quantise(S + sum dW) per step (--merge picks how), with reference_drift reported.
    reference: str = "exact"
    merge: str = "exact"
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    double_quant: bool = True
    logprob_impl: str = "auto"
    device: str = "auto"
    # bookkeeping
    save_every: int = 50
    diagnostics: bool = False
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Keys that may differ between a run and its --resume without changing what it computes.
RESUME_EXEMPT = frozenset({"save_every", "quiet", "output_dir", "diagnostics"})
CHOICES: dict[str, tuple[str, ...]] = {
    "target_init": ("previous", "base"),
    "reference": ("exact", "requantized"),
    "compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "optim": ("auto", "adamw", "paged_adamw_8bit", "paged_adamw_32bit"),
    "device": ("auto", "cpu", "cuda"),
}
POSITIVE: tuple[str, ...] = (
    "max_length",
    "max_prompt_length",
    "batch_size",
    "grad_accum",
    "lora_r",
    "save_every",
)


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
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InputError(f"--config {path}: unknown option '{key}' (known: {', '.join(sorted(known))})")
        out[name] = value
    return out


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """defaults < file < flags (flags whose value is None were not given)."""
    values = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    config = RunConfig(**values)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    if not config.model:
        raise InputError("--model is required (a hub id, a local directory, or an alias such as 'tiny')")
    if not config.steps:
        raise InputError("--steps is required (comma-separated step items, e.g. openorca,ultrafeedback)")
    if not config.output_dir:
        raise InputError("--output-dir is required (the run directory, e.g. runs/NAME)")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise InputError(
                f"--{name.replace('_', '-')} {getattr(config, name)!r}: expected one of {', '.join(choices)}"
            )
    for name in POSITIVE:
        if int(getattr(config, name)) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.beta <= 0:
        raise InputError(f"--beta must be positive, got {config.beta}")
    if config.learning_rate <= 0:
        raise InputError(f"--learning-rate must be positive, got {config.learning_rate}")
    if config.epochs <= 0:
        raise InputError(f"--epochs must be positive, got {config.epochs}")
    if not 0 <= config.warmup_ratio < 1:
        raise InputError(f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}")
    if not 0 <= config.lora_dropout < 1:
        raise InputError(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")


def resume_differences(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """The option names whose values differ between run.json's config and this invocation."""
    now = current.to_dict()
    keys = sorted(set(saved) | set(now))
    return [k for k in keys if k not in RESUME_EXEMPT and saved.get(k) != now.get(k)]
