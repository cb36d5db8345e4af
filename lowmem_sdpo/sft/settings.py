"""SFT's settings: the run settings (engine/config.py's RunConfig) with SFT's defaults, less the options it has
no use for. `sft` registers no flag for those (argparse refuses one in a line, exit 2), and `check_sft_config`
refuses a RunConfig that sets one (a caller of run_sft), so no option is ever accepted and silently ignored.

Kept: everything the shared training loop, the 4-bit load and the LoRA use, plus --deterministic (the
ordered log-prob implementation, as `run`) and --report-to (the tracker callback, as `run`).
Torch-free: the CLI checks its flags before torch is imported.
"""

from __future__ import annotations

from dataclasses import replace

from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.errors import InputError

# The options sft does not use -> why (the refusal's words).
NOT_SFT: dict[str, str] = {
    "columns": "SFT rows are read by their layout (prompt/completion, messages, alpaca, OpenOrca, preference)",
    "desirable_threshold": "SFT keeps no unpaired labels",
    "loss": "SFT's objective is the answer tokens' negative log-likelihood",
    "loss_options": "SFT's objective is the answer tokens' negative log-likelihood",
    "beta": "SFT has no reference model",
    "reference_batch_size": "SFT has no reference pass",
    "target_init": "SFT trains one LoRA on the base model",
    "reference": "SFT has no reference model",
    "merge": "SFT exports S by the exact merge",
    "diagnostics": "the diagnostics are sDPO's (gamma of S, training shift)",
    "bound_cpu_heap": "run's CPU heap setting (runtime/cpu_heap.py); sft does not apply it",
    "eval_split": "held-out evaluation scores preference pairs; SFT has none",
    "eval_steps": "held-out evaluation scores preference pairs; SFT has none",
    "eval_every": "held-out evaluation scores preference pairs; SFT has none",
}
# `sft --data` fills RunConfig.steps (the data spec); a caller of run_sft sets it directly.
DATA_FIELD = "steps"
# QLoRA SFT defaults (the alignment-handbook's Zephyr SFT QLoRA recipe: lr 2e-4, cosine, 10% warm-up).
SFT_DEFAULTS = replace(RunConfig(), learning_rate=2e-4, save_every=100)


def check_sft_config(config: RunConfig) -> None:
    """InputError naming the first option SFT does not use that `config` sets away from its default."""
    defaults = RunConfig()
    for name, why in NOT_SFT.items():
        if getattr(config, name) != getattr(defaults, name):
            raise InputError(f"sft does not use --{name.replace('_', '-')} ({why}); drop it")
