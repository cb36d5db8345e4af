"""The SFT pipeline: a fresh LoRA on Q(base), trained by the shared loop (engine/training/loop.py: AdamW with
warm-up and cosine decay, checkpoints every --save-every optimiser steps and on SIGINT/SIGTERM, resume with
the same data order, ranks) with SFT's window (sft/window.py), then the adapter is saved and S = base + dW is
exported as a Hugging Face checkpoint by the exact merge.

    RUN/sft.json            what made the run (a resumed run must match it)
    RUN/train/              checkpoint/ (while training), metrics.jsonl (loss, tokens/s per optimiser step)
    RUN/adapter/            the LoRA adapter (peft format)
    RUN/model/              S: the merged checkpoint (--model RUN/model)
    RUN/summary.json        written last: marks the run done
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.atomic import atomic_dir, write_json
from lowmem_sdpo.data import load_tokenizer, tokenize_step
from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.engine.training.deterministic import training_impl
from lowmem_sdpo.engine.training.loop import Loop, StepCallback, train_loop
from lowmem_sdpo.engine.training.schedule import build_schedule
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import (
    add_lora,
    export_merged,
    model_fingerprint,
    resolve_model,
)
from lowmem_sdpo.models.lora import enable_checkpointing
from lowmem_sdpo.runtime.distributed import Ranks, process_group
from lowmem_sdpo.runtime.hardware import Hardware, resolve_hardware
from lowmem_sdpo.runtime.open_model import OpenModel, open_model
from lowmem_sdpo.runtime.peaks import PhasePeaks, out_of_memory_reported
from lowmem_sdpo.runtime.reporting import Reporter
from lowmem_sdpo.settings_record import check_settings_record
from lowmem_sdpo.sft.data import load_sft_examples
from lowmem_sdpo.sft.settings import check_sft_config
from lowmem_sdpo.sft.window import SftWindow
from lowmem_sdpo.trackers import check_tracker, open_tracker

RUN_FILE = "sft.json"
TRAIN_DIR = "train"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
# Options that may differ on --resume without changing the numbers.
RESUME_EXEMPT = ("quiet", "save_every", "output_dir", "diagnostics")


def _record(config: RunConfig, data_fp: str, model_fp: str, export_dtype: str) -> dict[str, Any]:
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUME_EXEMPT}
    return {
        "config": settings,
        "data_fingerprint": data_fp,
        "model_fingerprint": model_fp,
        "export_dtype": export_dtype,
    }


def run_sft(
    config: RunConfig,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    limits: dict[str, int] | None = None,
    export_dtype: str = "bfloat16",
    callbacks: list[StepCallback] | None = None,
) -> dict[str, Any]:
    """Train, save, export; returns the summary. `config.steps` holds the SFT data spec. Under a launcher, on
    every rank (data-parallel, as `run`: rank 0 alone writes files)."""
    check_sft_config(config)
    with process_group() as ranks:
        return _run_sft(config, ranks, resume, reporter, limits, export_dtype, list(callbacks or []))


def _run_sft(
    config: RunConfig,
    ranks: Ranks,
    resume: bool,
    reporter: Reporter | None,
    limits: dict[str, int] | None,
    export_dtype: str,
    callbacks: list[StepCallback],
) -> dict[str, Any]:
    # Ranks other than 0 show nothing.
    reporter = (
        reporter if ranks.is_main and reporter is not None else Reporter(config.quiet or not ranks.is_main)
    )
    out = Path(config.output_dir)
    done = out / SUMMARY_FILE
    if resume and done.is_file():
        reporter.note(f"{out}: SFT already done; S is {out / MODEL_DIR}")
        return json.loads(done.read_text())
    check_tracker(config.report_to)
    started = time.perf_counter()
    hw = resolve_hardware(config)
    impl = training_impl(hw, config.logprob_impl, deterministic=config.deterministic)
    model_dir = resolve_model(config.model, config.revision)
    tokenizer = load_tokenizer(str(model_dir))
    data = load_sft_examples(config.steps, seed=config.seed, limits=limits)
    tokenized = tokenize_step(
        data, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length
    )
    examples = tokenized.unpaired
    if not examples:
        raise InputError(f"--data {config.steps}: no example left after tokenization")
    record = _record(config, data.fingerprint(), model_fingerprint(model_dir), export_dtype)
    if ranks.is_main:
        check_settings_record(out / RUN_FILE, record, what="SFT run", resume=resume, resume_needs_record=True)
    ranks.barrier()  # rank 0 has checked (and for a new run written) sft.json
    peaks = PhasePeaks(hw)
    with out_of_memory_reported(peaks, "SFT"):
        with peaks.phase("load"):
            model, policy = _policy(config, model_dir, hw, reporter, examples, tokenized.stats)
        # The global schedule: micro-batches of batch_size x ranks examples, each rank running its part.
        schedule = build_schedule(
            len(examples),
            epochs=config.epochs,
            batch_size=config.batch_size * ranks.world,
            grad_accum=config.grad_accum,
            seed=config.seed,
        )
        # one tracker per run: rank 0 feeds it
        tracker = open_tracker(config.report_to, out, config.to_dict()) if ranks.is_main else None
        loop = Loop(
            name="SFT",
            task="SFT",
            out=out / TRAIN_DIR,
            total=len(schedule),
            config=config,
            hw=hw,
            reporter=reporter,
            seed=config.seed,
            ranks=ranks,
            callbacks=[*callbacks, *([tracker] if tracker is not None else [])],
            shown=lambda row: {"loss": row["loss"], "tok_s": round(row["tokens_per_second"])},
        )
        window = SftWindow(examples, schedule, int(tokenizer.pad_token_id), hw, impl, out / TRAIN_DIR, ranks)
        try:
            with peaks.phase("train"):
                rows = train_loop(policy, loop, window, resume=resume)
        finally:
            if tracker is not None:
                tracker.close()
        with peaks.phase("save"):
            if ranks.is_main:
                with atomic_dir(out / ADAPTER_DIR) as tmp:
                    policy.save_pretrained(str(tmp), safe_serialization=True)
            del policy
            model.release()
            if ranks.is_main:  # S = base + dW by the exact merge from the base's full-precision weights
                export_merged(
                    model_dir,
                    [out / ADAPTER_DIR],
                    out / MODEL_DIR,
                    dtype=getattr(torch, export_dtype),
                    progress=reporter.merge_progress(),
                )
    summary = {
        "examples": len(examples),
        "dropped": tokenized.stats,
        "optimizer_steps": len(schedule),
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "model": str(out / MODEL_DIR),
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_bytes": peaks.overall(),
        "peak_memory_bytes_by_phase": peaks.as_dict(),
    }
    if ranks.is_main:
        write_json(done, summary)
        reporter.note(f"SFT done: S written to {out / MODEL_DIR} (use --model {out / MODEL_DIR})")
    ranks.barrier()  # every rank ends when S and the summary are written
    return summary


def _policy(
    config: RunConfig,
    model_dir: Path,
    hw: Hardware,
    reporter: Reporter,
    examples: list[Any],
    stats: dict[str, Any],
) -> tuple[OpenModel, torch.nn.Module]:
    """(the opened base, Q(base) in 4 bit with a fresh LoRA seeded by --seed)."""
    dropped = stats.get("dropped") or {}
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
    reporter.note(f"SFT: {len(examples)} examples{f' ({why} dropped)' if why else ''}")
    model = open_model(model_dir, hw, double_quant=config.double_quant, reporter=reporter)
    policy = add_lora(
        model.model_for(),
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        dropout_impl=config.lora_dropout_impl,
        seed=config.seed,
    )
    if config.gradient_checkpointing:
        enable_checkpointing(policy.get_base_model())
    return model, policy
