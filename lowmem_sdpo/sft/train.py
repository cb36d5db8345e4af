"""The SFT loop: a fresh LoRA on Q(base), AdamW with warm-up and cosine decay, checkpoints every
--save-every optimiser steps (a killed run resumes from the last one with the same data order), then the
adapter is saved and S = base + dW is exported as a Hugging Face checkpoint by the exact merge.

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
from lowmem_sdpo.engine import RunConfig
from lowmem_sdpo.engine.rundir.metrics import METRICS_FILE, MetricsLog
from lowmem_sdpo.engine.training.checkpoint import RngState, TrainState, load_checkpoint, save_checkpoint
from lowmem_sdpo.engine.training.optim import cosine_with_warmup, make_optimizer, resolve_optimizer
from lowmem_sdpo.engine.training.schedule import build_schedule
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models import (
    add_lora,
    export_merged,
    model_fingerprint,
    resolve_model,
)
from lowmem_sdpo.models.lora import enable_checkpointing
from lowmem_sdpo.runtime.hardware import resolve_hardware, resolve_logprob_impl
from lowmem_sdpo.runtime.open_model import open_model
from lowmem_sdpo.runtime.reporting import Reporter
from lowmem_sdpo.settings_record import check_settings_record
from lowmem_sdpo.sft.data import load_sft_examples
from lowmem_sdpo.sft.loss import answer_tokens, collate_examples, sft_loss_part

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
) -> dict[str, Any]:
    """Train, save, export; returns the summary. `config.steps` holds the SFT data spec."""
    reporter = reporter or Reporter(config.quiet)
    out = Path(config.output_dir)
    done = out / SUMMARY_FILE
    if resume and done.is_file():
        reporter.note(f"{out}: SFT already done; S is {out / MODEL_DIR}")
        return json.loads(done.read_text())
    started = time.perf_counter()
    hw = resolve_hardware(config)
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
    check_settings_record(out / RUN_FILE, record, what="SFT run", resume=resume, resume_needs_record=True)
    impl = resolve_logprob_impl(hw, config.logprob_impl)
    dropped = tokenized.stats.get("dropped") or {}
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
    reporter.note(f"SFT: {len(examples)} examples{f' ({why} dropped)' if why else ''}")
    model = open_model(model_dir, hw, double_quant=config.double_quant, reporter=reporter)
    policy = add_lora(
        model.model_for(),
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        seed=config.seed,
    )
    if config.gradient_checkpointing:
        enable_checkpointing(policy.get_base_model())
    schedule = build_schedule(
        len(examples),
        epochs=config.epochs,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        seed=config.seed,
    )
    rows = _train(
        policy,
        examples,
        schedule,
        config,
        hw,
        impl,
        int(tokenizer.pad_token_id),
        out / TRAIN_DIR,
        reporter,
        resume,
    )
    with atomic_dir(out / ADAPTER_DIR) as tmp:
        policy.save_pretrained(str(tmp), safe_serialization=True)
    del policy
    model.release()
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
    }
    write_json(done, summary)
    reporter.note(f"SFT done: S written to {out / MODEL_DIR} (use --model {out / MODEL_DIR})")
    return summary


def _train(
    policy: torch.nn.Module,
    examples: list[Any],
    schedule: list[list[list[int]]],
    config: RunConfig,
    hw: Any,
    impl: str,
    pad_id: int,
    train_dir: Path,
    reporter: Reporter,
    resume: bool,
) -> list[dict[str, Any]]:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        resolve_optimizer(config.optim, hw.is_cuda), params, config.learning_rate, config.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, len(schedule), config.warmup_ratio)
    scaler = torch.amp.GradScaler(hw.device.type) if hw.needs_grad_scaler else None
    start = 0
    checkpoint = load_checkpoint(train_dir) if resume else None
    if checkpoint is not None:
        set_peft_model_state_dict(policy, checkpoint.adapter)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        if scaler is not None and checkpoint.scaler is not None:
            scaler.load_state_dict(checkpoint.scaler)
        checkpoint.rng.restore()
        start = checkpoint.state.opt_steps_done
        reporter.note(f"SFT: resuming at optimiser step {start + 1}/{len(schedule)}")
    else:
        torch.manual_seed(config.seed)
    log = MetricsLog(train_dir / METRICS_FILE, keep_lines=start)
    policy.train()
    with reporter.task("SFT", total=len(schedule)) as advance:
        advance(start)
        for k in range(start, len(schedule)):
            t0 = time.perf_counter()
            window = [[examples[i] for i in mb] for mb in schedule[k]]
            window_tokens = sum(answer_tokens(mb) for mb in window)
            loss_sum = 0.0
            seen = 0
            for mb in window:
                batch = collate_examples(mb, pad_id)
                loss, _ = sft_loss_part(policy, batch, window_tokens, hw=hw, impl=impl)
                if not torch.isfinite(loss):
                    raise InputError(
                        f"SFT: non-finite loss at optimiser step {k + 1}; try a lower --learning-rate"
                    )
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += float(loss.detach())
                seen += int(batch["attention_mask"].sum())
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            row = {"opt_step": k + 1, "loss": loss_sum, "answer_tokens": window_tokens, "lr": lr,
                   "tokens_per_second": seen / max(seconds, 1e-9), "seconds": seconds}  # fmt: skip
            log.append(row)
            advance(1, loss=row["loss"], tok_s=round(row["tokens_per_second"]))
            done = k + 1
            if done % config.save_every == 0 and done < len(schedule):
                save_checkpoint(
                    train_dir,
                    adapter_state=get_peft_model_state_dict(policy),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    rng=RngState.capture(),
                    state=TrainState(opt_steps_done=done, optimizer=type(optimizer).__name__),
                    scaler=scaler,
                )
    policy.eval()
    return log.rows
