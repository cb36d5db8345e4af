"""Ours against TRL 1.16's DPOTrainer + PEFT on the real model (issue 24, item 5): the same numbers, or why not.

Both sides load SmolLM2-135M-Instruct (the `smollm2-135m-instruct-q4` alias) in NF4 with double quantisation and
fp32 compute, bitsandbytes' CPU repacking switched off (lowmem_sdpo.models.quant.disable_cpu_repacking, on TRL's
model too), and train a LoRA (r 8, alpha 16, dropout 0, every block linear) from the same A/B tensors (ours'
add_lora init, copied into TRL's adapters) on the first --pairs chat pairs of examples/data/chat_pairs.jsonl in
file order (TRL: train_sampling_strategy="sequential"), with torch AdamW (betas 0.9/0.999, eps 1e-8, no weight
decay), clipping at 1.0, beta 0.1, cosine schedule without warm-up (ours warmup_ratio 0, TRL warmup_steps 0),
the same micro-batch and accumulation, no dropout, no gradient checkpointing. TRL precomputes its reference
(precompute_ref_log_probs), so its per-sequence values can be read.

Ours runs the engine's own pieces, as run_sdpo calls them: compute_logps (the reference pass `run` caches) and
train_step (its optimiser loop), on (a) ours' own tokens and (b) TRL's exact token ids. By design:
  * tokens: TRL renders prompt + answer with the chat template and keeps what follows the prompt, so its answers
    end with the template's "\\n" after <|im_end|>; ours end at <|im_end|>. (b) takes that out.
  * TRL casts the LoRA factors of a 4-bit model to bf16 (QLoRA's recipe); ours keeps them fp32. TRL is run with
    its adapters put back in fp32 for the exact comparison, and once as it ships (bf16) to show what it is worth.
Noise floor: ours against ours with the head's reduction order changed (logprob impl "naive", full logits, in
place of the chunked one; the reference also in other batches). Tolerances: crosscheck_stats.NOISE_FACTOR x it.

    PYTHONPATH=.:kernels .venv-bench/bin/python benchmarks/crosscheck_trl.py

Writes benchmarks/results/crosscheck_trl_smollm2.json (benchmarks/README.md, "crosscheck_trl.py"); exit 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import write_json_atomic
from crosscheck_stats import (
    NOISE_FACTOR,
    STEP_FIGURES,
    TRL_KEYS,
    delta_stats,
    lora_check,
    lora_compared,
    step_checks,
    steps_compared,
    tokens_compared,
    tolerance,
    verdict,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "crosscheck_trl_smollm2.json"
PAIRS_FILE = REPO / "examples" / "data" / "chat_pairs.jsonl"
ALIAS = "smollm2-135m-instruct-q4"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Settings:
    pairs: int = 20
    batch: int = 2
    accum: int = 2
    learning_rate: float = 1e-4
    beta: float = 0.1
    lora_r: int = 8
    lora_alpha: int = 16
    max_length: int = 96
    max_prompt_length: int = 64
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.pairs // (self.batch * self.accum)


def ours_side(
    s: Settings, model_dir: Path, step_file: Path, trl_tokens: list[Any], tmp: Path
) -> dict[str, Any]:
    """Ours' reference passes and training runs: native tokens, TRL's tokens, TRL's tokens with the naive head."""
    import torch

    from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
    from lowmem_sdpo.engine.reference.logps import compute_logps
    from lowmem_sdpo.engine.units import Unit, build_units
    from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized
    from lowmem_sdpo.runtime.hardware import Hardware, resolve_logprob_impl
    from lowmem_sdpo.runtime.reporting import Reporter

    hw = Hardware(torch.device("cpu"), "float32")
    impl = resolve_logprob_impl(hw, "auto")
    tokenizer = load_tokenizer(str(model_dir))
    step = load_steps(str(step_file), seed=s.seed)[0]
    tokenized = tokenize_step(step, tokenizer, max_length=s.max_length, max_prompt_length=s.max_prompt_length)
    native, _ = build_units(tokenized, seed=s.seed, label="crosscheck")
    aligned = [Unit(p, c, p, r) for p, c, r in trl_tokens]
    model = load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32"))  # repacking off inside

    def reference(units: list[Unit], batch: int, how: str) -> tuple[list[float], list[float]]:
        table = compute_logps(
            model, units, pad_id=tokenizer.pad_token_id, batch_size=batch, hw=hw, impl=how, with_kl=False,
            reporter=Reporter(True), description="reference",
        )  # fmt: skip
        return table.chosen.tolist(), table.rejected.tolist()

    # `run`'s reference batch is 2 x --batch-size units; the noise variant: --batch-size units, the naive head.
    refs = {
        "native": reference(native, 2 * s.batch, impl),
        "aligned": reference(aligned, 2 * s.batch, impl),
        "aligned_noise": reference(aligned, s.batch, "naive"),
    }
    policy = add_lora(model, r=s.lora_r, alpha=s.lora_alpha, dropout=0.0, seed=s.seed)
    init = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    pad = tokenizer.pad_token_id
    runs = {
        "native": ours_train(s, policy, init, native, refs["native"], impl, pad, tmp / "native"),
        "aligned": ours_train(s, policy, init, aligned, refs["aligned"], impl, pad, tmp / "aligned"),
        "aligned_noise": ours_train(
            s, policy, init, aligned, refs["aligned_noise"], "naive", pad, tmp / "noise"
        ),
    }
    return {
        "impl": impl, "tokens": [(u.chosen_prompt, u.chosen, u.rejected) for u in native],
        "truncated": tokenized.stats["truncated"], "dropped": tokenized.stats["dropped"],
        "refs": refs, "runs": runs, "init": init,
    }  # fmt: skip


def ours_train(
    s: Settings,
    policy: Any,
    init: dict[str, Any],
    units: list[Any],
    ref: Any,
    impl: str,
    pad: int,
    sdir: Path,
) -> dict[str, Any]:
    """The engine's train_step from `init`, the units in file order: [[0, 1], [2, 3]], [[4, 5], [6, 7]], ..."""
    import torch

    from lowmem_sdpo.engine.config import RunConfig
    from lowmem_sdpo.engine.reference.logps import LogpTable
    from lowmem_sdpo.engine.training.objective import Objective
    from lowmem_sdpo.engine.training.trainer import StepJob, train_step
    from lowmem_sdpo.runtime.hardware import Hardware
    from lowmem_sdpo.runtime.reporting import Reporter

    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name in init:
                param.copy_(init[name])
    window = s.batch * s.accum
    schedule = [
        [list(range(k + m, k + m + s.batch)) for m in range(0, window, s.batch)]
        for k in range(0, s.steps * window, window)
    ]
    cfg = RunConfig(
        learning_rate=s.learning_rate, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw",
        beta=s.beta, batch_size=s.batch, grad_accum=s.accum, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
        lora_dropout=0.0, gradient_checkpointing=False, save_every=10**6,
    )  # fmt: skip
    sdir.mkdir(parents=True)
    job = StepJob(
        t=1, step_dir=sdir, units=units, reference=LogpTable(torch.tensor(ref[0]), torch.tensor(ref[1])),
        schedule=schedule, objective=Objective("sigmoid", s.beta), config=cfg,
        hw=Hardware(torch.device("cpu"), "float32"), impl=impl, pad_id=pad, reporter=Reporter(True), seed=s.seed,
    )  # fmt: skip
    rows = train_step(policy, job, resume=False)
    final = {n: p.detach().clone() for n, p in policy.named_parameters() if n in init}
    return {"rows": [{k: r[k] for k in (*STEP_FIGURES, "lr")} for r in rows], "final": final}


def trl_trainer(s: Settings, model_dir: Path, rows: list[dict[str, Any]], out: Path) -> Any:
    """TRL's DPOTrainer + PEFT on its own NF4 load of the model (transformers' bitsandbytes integration)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from lowmem_sdpo.models import disable_cpu_repacking

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=bnb, dtype=torch.float32, device_map={"": "cpu"}
    )
    disable_cpu_repacking(
        model
    )  # before the precompute's no-grad eval forward, where bitsandbytes would repack
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=s.batch, gradient_accumulation_steps=s.accum,
        num_train_epochs=1, learning_rate=s.learning_rate, lr_scheduler_type="cosine", warmup_steps=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=1.0, beta=s.beta, max_length=s.max_length, train_sampling_strategy="sequential",
        disable_dropout=True, gradient_checkpointing=False, bf16=False, use_cpu=True,
        precompute_ref_log_probs=True, seed=s.seed, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_pin_memory=False,
    )  # fmt: skip
    lora = LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )


def trl_train(trainer: Any, init: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """TRL's training from ours' initial LoRA tensors, held in `dtype` (TRL's own on a 4-bit model: bf16)."""
    from transformers import TrainerCallback

    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    if set(params) != set(init):
        raise RuntimeError(f"LoRA parameters differ: {sorted(set(params) ^ set(init))[:4]}")
    for name, param in params.items():
        param.data = init[name].to(dtype).clone()  # before train(), which builds the optimiser over them
    lrs: list[float] = []

    class LearningRate(
        TrainerCallback
    ):  # the rate each optimiser step runs at (the logged one is the next's)
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            lrs.append(float(kw["optimizer"].param_groups[0]["lr"]))

    trainer.add_callback(LearningRate())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h and "loss" in h]
    rows = [
        {k: float(h[key]) for k, key in TRL_KEYS.items()} | {"lr": lr}
        for h, lr in zip(logs, lrs, strict=True)
    ]
    final = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if n in init}
    return {"rows": rows, "final": final}


def both(ref: Any) -> list[float]:
    """(chosen, rejected) per-sequence values -> one list, chosen first."""
    return list(ref[0]) + list(ref[1])


def compare(s: Settings, ours: dict[str, Any], trl_ref: Any, trl32: dict, trl16: dict) -> dict[str, Any]:
    refs, runs, init = ours["refs"], ours["runs"], ours["init"]
    ref_noise = delta_stats(both(refs["aligned"]), both(refs["aligned_noise"]))
    ref_tol = tolerance(ref_noise["max"], max(abs(x) for x in both(trl_ref)))
    lora_noise = lora_compared(runs["aligned"]["final"], runs["aligned_noise"]["final"], init)
    lora_aligned = lora_compared(runs["aligned"]["final"], trl32["final"], init)
    checks = {
        "reference_per_sequence": verdict(delta_stats(both(refs["aligned"]), both(trl_ref))["max"], ref_tol),
        **step_checks(runs["aligned"]["rows"], trl32["rows"], runs["aligned_noise"]["rows"]),
        "lora_after_training": lora_check(lora_aligned, lora_noise),
    }
    named = lambda ref: dict(zip(("chosen", "rejected"), ref, strict=True))  # noqa: E731
    return {
        "reference": {
            "trl": named(trl_ref), "ours_native": named(refs["native"]), "ours_on_trl_tokens": named(refs["aligned"]),
            "delta_native": delta_stats(both(refs["native"]), both(trl_ref)),
            "delta_on_trl_tokens": delta_stats(both(refs["aligned"]), both(trl_ref)),
            "noise_ours_vs_ours": ref_noise,
        },
        "steps": {
            "trl": trl32["rows"], "ours_on_trl_tokens": runs["aligned"]["rows"], "ours_native": runs["native"]["rows"],
            "trl_bf16_adapters": trl16["rows"], "ours_noise_variant": runs["aligned_noise"]["rows"],
            "delta_on_trl_tokens": steps_compared(runs["aligned"]["rows"], trl32["rows"]),
            "delta_native": steps_compared(runs["native"]["rows"], trl32["rows"]),
            "delta_trl_bf16_adapters": steps_compared(runs["aligned"]["rows"], trl16["rows"]),
            "noise_ours_vs_ours": steps_compared(runs["aligned"]["rows"], runs["aligned_noise"]["rows"]),
        },
        "lora": {
            "on_trl_tokens": lora_aligned, "noise_ours_vs_ours": lora_noise,
            "trl_bf16_adapters": lora_compared(runs["aligned"]["final"], trl16["final"], init),
        },
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    for name, default in asdict(Settings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
    if s.pairs % (s.batch * s.accum):
        parser.error("--pairs must be a multiple of --batch x --accum (whole optimiser steps on both sides)")
    import torch
    import trl
    from transformers import AutoTokenizer

    from lowmem_sdpo.host import host_record
    from lowmem_sdpo.models import resolve_model

    started, load_start = time.perf_counter(), os.getloadavg()
    model_dir = resolve_model(ALIAS)
    rows = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines()[: s.pairs]]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        step_file = tmp / "pairs.jsonl"
        step_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        trainer = trl_trainer(s, model_dir, rows, tmp / "trl32")
        data = trainer.train_dataset
        trl_tokens = list(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True))
        trl_ref = (list(data["ref_chosen_logps"]), list(data["ref_rejected_logps"]))
        ours = ours_side(s, model_dir, step_file, trl_tokens, tmp / "ours")
        trl32 = trl_train(trainer, ours["init"], torch.float32)
        del trainer
        trl16 = trl_train(trl_trainer(s, model_dir, rows, tmp / "trl16"), ours["init"], torch.bfloat16)
    tokens = tokens_compared(ours["tokens"], trl_tokens, AutoTokenizer.from_pretrained(str(model_dir)).decode)
    result = {
        "what": "lowmem-sdpo's engine against TRL DPOTrainer + PEFT on SmolLM2-135M-Instruct (NF4, fp32 compute)",
        "settings": asdict(s) | {"optimizer_steps": s.steps, "ours_logprob_impl": ours["impl"],
                                 "noise_factor": NOISE_FACTOR},
        "tokens": tokens | {"ours_truncated": ours["truncated"], "ours_dropped": ours["dropped"],
                            "trl_longest": max(len(p) + max(len(c), len(r)) for p, c, r in trl_tokens)},
        **compare(s, ours, trl_ref, trl32, trl16),
        "versions": {"torch": torch.__version__, "trl": trl.__version__},
        "host": host_record(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    write_json_atomic(args.out, result, indent=1)
    for name, c in result["checks"].items():
        print(
            f"{name:26s} |d| {c['max_abs_diff']:.3g}  tol {c['tolerance']:.3g}  {'ok' if c['ok'] else 'FAIL'}"
        )
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
