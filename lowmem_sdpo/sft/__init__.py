"""QLoRA SFT (`lowmem-sdpo sft`): the paper's S from a base model, through the same 4-bit + LoRA path and
fused log-prob kernel as sDPO training; the result is exported as a bf16 checkpoint `--model` accepts."""
