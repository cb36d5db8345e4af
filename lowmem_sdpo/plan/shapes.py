"""Exact byte counts from a model's shapes: its NF4 block linears, the weights left in the compute dtype, the
LoRA and frozen-delta parameter counts and the 8-bit AdamW state.

NF4 (bitsandbytes 0.50, `functional.quantize_4bit`, blocksize 64, uint8 storage), per weight of n elements
in b = ceil(n / 64) blocks:
  * packed data: two 4-bit codes per byte, (n + 1) // 2 bytes;
  * `code`: the 16-entry NF4 table as fp32, a fresh tensor per weight (`get_4bit_type` allocates it), 64 B;
  * without double quantisation: absmax, one fp32 per block, 4b bytes;
  * with it (the default): absmax - mean(absmax) quantised blockwise with blocksize 256 (`quantize_blockwise`):
    b uint8 bytes, plus state2: ceil(b / 256) fp32 second-level absmax, a copy of the 256-entry fp32 dynamic
    map (`code.to(device, copy=True)`: 1 KiB per weight) and the fp32 `offset` scalar (4 B).
So at n = 14336 x 4096 (SOLAR's MLP) the double-quantised weight is 29.36 MB packed + 0.92 MB absmax +
15.4 KB of constants: 4.127 bits per weight.
These are tensor bytes; the CUDA caching allocator rounds each allocation up to 512 B, under 1 MB over a
whole 10.7B model (336 weights x 5 tensors), left to the fragmentation allowance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lowmem_sdpo.models.blocks import decoder_block_lists

NF4_BLOCK = 64  # Params4bit's default blocksize, kept by transformers' bitsandbytes integration
NESTED_BLOCK = 256  # quantize_4bit quantises absmax with quantize_blockwise(blocksize=256)
CODE_4BIT_BYTES = 16 * 4  # NF4 table, fp32
CODE_8BIT_BYTES = 256 * 4  # dynamic 8-bit map, fp32
OFFSET_BYTES = 4  # fp32 scalar: mean of absmax
FP32 = 4

# bitsandbytes' 8-bit optimisers (Optimizer2State.init_state): a parameter under min_8bit_size elements gets
# two fp32 states; a larger one two uint8 states plus one fp32 absmax per 256-element block for each, and the
# optimiser shares one 256-entry fp32 map per state (qmap1, qmap2) across all parameters.
MIN_8BIT_SIZE = 4096
OPTIM_BLOCK = 256


@dataclass(frozen=True)
class Nf4Size:
    packed: int
    absmax: int  # first-level scales: uint8 (double quant) or fp32 per block
    constants: int  # code tables, offset, second-level absmax

    @property
    def total(self) -> int:
        return self.packed + self.absmax + self.constants


def nf4_size(numel: int, double_quant: bool = True) -> Nf4Size:
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = (numel + 1) // 2
    if not double_quant:
        return Nf4Size(packed, blocks * FP32, CODE_4BIT_BYTES)
    second = math.ceil(blocks / NESTED_BLOCK) * FP32 + CODE_8BIT_BYTES + OFFSET_BYTES
    return Nf4Size(packed, blocks, CODE_4BIT_BYTES + second)


@dataclass(frozen=True)
class BlockLinear:
    name: str
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def block_linears(model: nn.Module) -> list[BlockLinear]:
    """The linears inside the decoder blocks: what load_quantized holds in 4 bit and add_lora targets.

    Same selection as models.blocks.block_linear_names (tested equal) for a model that is not quantised yet,
    without its Linear4bit check: importing bitsandbytes would triple the plan's start-up time.
    """
    lists = decoder_block_lists(model)
    return [
        BlockLinear(name, int(module.out_features), int(module.in_features), module.bias is not None)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name.startswith(p + ".") for p in lists)
    ]


@dataclass(frozen=True)
class ModelShapes:
    """What the memory plan needs from an architecture (read off its meta-device skeleton)."""

    linears: tuple[BlockLinear, ...]
    other_param_bytes: int  # every parameter but the block linears' weights, in the compute dtype
    buffer_bytes: int  # rotary tables etc., in their own dtypes
    head_params: int  # the lm head's weight (a matmul per token, unlike the input embedding)
    total_params: int
    element_size: int  # bytes per element of the compute dtype
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int

    @property
    def block_params(self) -> int:
        return sum(lin.numel for lin in self.linears)

    def nf4_bytes(self, double_quant: bool = True) -> int:
        return sum(nf4_size(lin.numel, double_quant).total for lin in self.linears)

    def largest_linear(self) -> int:
        """Elements of the largest block weight: the dense buffer bitsandbytes dequantises it into."""
        return max(lin.numel for lin in self.linears)

    def layer_linears(self) -> tuple[BlockLinear, ...]:
        """The block linears of one decoder layer (the first; decoder layers are alike)."""
        n = self.n_layers
        return self.linears[: len(self.linears) // n] if n else self.linears

    def lora_shapes(self, r: int) -> list[int]:
        """Element counts of every LoRA factor: A [r, in] and B [out, r] per block linear."""
        return [k for lin in self.linears for k in (r * lin.in_features, lin.out_features * r)]

    def lora_params(self, r: int) -> int:
        return sum(self.lora_shapes(r))

    def delta_params(self, r: int, adapters: int) -> int:
        """The frozen delta after `adapters` finished steps: per block linear [r*k, in] and [out, r*k]."""
        return adapters * self.lora_params(r)


def adamw8bit_state_bytes(numels: list[int]) -> int:
    """bitsandbytes AdamW8bit's state for parameters of these sizes (see MIN_8BIT_SIZE above)."""
    total = 0
    any_8bit = False
    for n in numels:
        if n < MIN_8BIT_SIZE:
            total += 2 * n * FP32
        else:
            any_8bit = True
            total += 2 * n + 2 * math.ceil(n / OPTIM_BLOCK) * FP32
    return total + (2 * CODE_8BIT_BYTES if any_8bit else 0)


def adamw32_state_bytes(numels: list[int]) -> int:
    """torch AdamW or bitsandbytes' 32-bit AdamW: exp_avg and exp_avg_sq in fp32."""
    return sum(2 * n * FP32 for n in numels)


def _config_int(config: object, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def model_shapes(model: nn.Module) -> ModelShapes:
    """Shapes of a meta-device skeleton (whose parameters are already in the compute dtype)."""
    config = model.config
    linears = tuple(block_linears(model))
    quantised = {lin.name + ".weight" for lin in linears}
    params = dict(model.named_parameters())  # deduplicated: a tied lm head counts once
    other = sum(p.numel() * p.element_size() for name, p in params.items() if name not in quantised)
    buffers = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    head = model.get_output_embeddings()
    head_params = int(head.weight.numel()) if head is not None else 0
    element_size = next(iter(params.values())).element_size()
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    n_heads = _config_int(config, "num_attention_heads", "n_head", default=1)
    return ModelShapes(
        linears=linears,
        other_param_bytes=int(other),
        buffer_bytes=int(buffers),
        head_params=head_params,
        total_params=int(sum(p.numel() for p in params.values())),
        element_size=int(element_size),
        n_layers=_config_int(config, "num_hidden_layers", "n_layer", default=1),
        hidden=hidden,
        intermediate=_config_int(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        n_heads=n_heads,
        n_kv_heads=_config_int(config, "num_key_value_heads", default=n_heads),
        head_dim=_config_int(config, "head_dim", default=hidden // n_heads),
        vocab=_config_int(config, "vocab_size"),
    )
