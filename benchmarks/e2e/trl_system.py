"""The TRL systems (`trl`, `trl-precompute`, `trl-liger`): DPOTrainer + PEFT LoRA on the same 4-bit model and step 1's
data, with every setting the systems share. trl is imported inside the worker: this module loads without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .clock import PhaseClock
from .preimport import preimport
from .settings import BETA, LEARNING_RATE, LORA, MAX_GRAD_NORM, SEED, WARMUP_RATIO, Shape


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
