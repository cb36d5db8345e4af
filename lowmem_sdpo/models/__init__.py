"""Models: resolving --model, the embedded tiny model, 4-bit loading of M_{t-1} with the exact merge,
fresh LoRA, and export of S + sum dW as a bf16 Hugging Face checkpoint.

model_dir = resolve_model("tiny")
model = load_quantized(model_dir, adapters=[step1_adapter], quant=QuantSettings(compute_dtype="float32"))
policy = add_lora(model, r=16, alpha=16, seed=0)
...
policy.save_pretrained(step2_adapter)
export_merged(model_dir, [step1_adapter, step2_adapter], out_dir)
"""

from lowmem_sdpo.models.adapters import adapter_deltas, load_lora_factors
from lowmem_sdpo.models.export import DeltaKept, export_merged
from lowmem_sdpo.models.head import HeadSpec, check_head, read_head
from lowmem_sdpo.models.loading import load_quantized
from lowmem_sdpo.models.lora import add_lora
from lowmem_sdpo.models.merge import MERGES
from lowmem_sdpo.models.quant import QuantSettings, dequantize_weight, disable_cpu_repacking, quantize_weight
from lowmem_sdpo.models.resolve import model_fingerprint, resolve_model
from lowmem_sdpo.models.tiny import build_tiny_model

__all__ = [
    "MERGES",
    "DeltaKept",
    "HeadSpec",
    "QuantSettings",
    "adapter_deltas",
    "add_lora",
    "build_tiny_model",
    "check_head",
    "dequantize_weight",
    "disable_cpu_repacking",
    "export_merged",
    "load_lora_factors",
    "load_quantized",
    "model_fingerprint",
    "quantize_weight",
    "read_head",
    "resolve_model",
]
