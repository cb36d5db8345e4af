"""The `ours` systems (`ours` and its variants, OURS_VARIANTS): lowmem-sdpo's run_sdpo over both steps, its phases
timed from the engine's phase events (lowmem_sdpo/runtime/peaks.py), never from its messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .clock import PhaseClock
from .preimport import preimport
from .settings import BETA, LEARNING_RATE, LORA, MAX_GRAD_NORM, SEED, WARMUP_RATIO, Shape

# The engine's phase events -> this benchmark's phase rows. The engine's measured phases "reference" and
# "save" are left out: "reference" holds step 1's model load, while the reference row is the pass alone
# (its tokens per second). "step" is handled by PhaseTimer itself.
ROW_OF_EVENT = {
    "load": "load",
    "reference_pass": "reference",
    "train": "train",
    "drift_pass": "drift",
    "base_pass": "other",
    "heldout_pass": "other",
}


class PhaseTimer:
    """A phase listener for run_sdpo: opens and closes the clock's phases as the engine's events arrive. A step row
    runs from the previous step's end (step 1's from before run_sdpo is called) to its own end, so a step's
    tokenisation counts as its own."""

    def __init__(self, clock: PhaseClock, steps_total: int) -> None:
        self.clock = clock
        self.steps_total = steps_total

    def __call__(self, event: Any) -> None:  # a lowmem_sdpo.runtime.peaks.PhaseEvent
        if event.name == "step":
            if event.edge == "start" and not self.clock.is_open("step", event.step):
                self.clock.start("step", event.step)
            elif event.edge == "end":
                self.clock.stop("step", event.step)
                if event.step < self.steps_total:
                    self.clock.start("step", event.step + 1)
            return
        row = ROW_OF_EVENT.get(event.name)
        if row is None:
            return
        if event.edge == "start":
            self.clock.start(row, event.step)
        else:
            self.clock.stop(row, event.step)


# system -> the RunConfig fields it sets apart from `ours`, the product's defaults.
OURS_VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ours-naive": {"logprob_impl": "naive"},  # full logits: the fused kernel's share
    "ours-torch-dropout": {"lora_dropout_impl": "torch"},  # peft's nn.Dropout: the lane dropout's share
}


def ours_worker(spec: dict[str, Any], clock: PhaseClock, result: dict[str, Any]) -> None:
    preimport()
    from lowmem_sdpo.engine import RunConfig, run_sdpo

    shape = Shape(**spec["shape"])
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
        device=spec["device"],
        quiet=True,
        **OURS_VARIANTS[spec["system"]],
    )
    clock.start("step", 1)
    with clock.phase("total"):
        summaries = run_sdpo(config, phase_listeners=[PhaseTimer(clock, steps_total=len(spec["data"]))])
    result["first_loss"] = summaries[0]["first_loss"]
    result["final_loss"] = summaries[0]["final_loss"]
    result["optimizer_steps"] = [s["optimizer_steps"] for s in summaries]
    result["tokens_seen"] = [_ours_tokens(Path(config.output_dir), s["step"]) for s in summaries]
    # The engine's own per-phase peaks (CUDA: max allocated per phase), beside this script's.
    result["engine_peaks"] = [s.get("peak_memory_bytes_by_phase") for s in summaries]
    run = json.loads((Path(config.output_dir) / "run.json").read_text())
    result["config"] = {
        "logprob_impl": run.get("logprob_impl"), "compute_dtype": run.get("compute_dtype"), "optim": config.optim,
        "lora_dropout_impl": config.lora_dropout_impl,
    }  # fmt: skip


def _ours_tokens(run_dir: Path, t: int) -> int:
    """Tokens the trainer counted (attention-mask sum of every micro-batch) over step t."""
    rows = [json.loads(line) for line in (run_dir / f"step-{t}" / "metrics.jsonl").read_text().splitlines()]
    return int(sum(r["tokens"] for r in rows))
