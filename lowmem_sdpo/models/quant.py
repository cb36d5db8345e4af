"""NF4 settings and the one function that quantises a weight.

Every 4-bit weight this project holds comes from `quantize_weight` (or from transformers' bitsandbytes
integration, which calls the very same `bnb.nn.Params4bit(...).to(device)`), on CPU and GPU alike, so
"the exact merge equals quantise(S + sum dW)" can be checked bit for bit with this function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from lowmem_sdpo.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit formats


@dataclass(frozen=True)
class QuantSettings:
    """How block linears are held in 4 bit. On CPU the engine passes compute_dtype="float32"."""

    quant_type: str = "nf4"
    double_quant: bool = True  # also quantise the per-block absmax (saves ~0.4 bit per weight)
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        # Settings come from user config: fail here with a readable line, not with a KeyError mid-load.
        if self.quant_type not in QUANT_TYPES:
            raise InputError(f"quant_type '{self.quant_type}': expected one of {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in DTYPES:
            raise InputError(f"compute_dtype '{self.compute_dtype}': expected one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def bnb_config(self, skip_modules: list[str]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.torch_compute_dtype,
            llm_int8_skip_modules=skip_modules,
        )


def quantize_weight(weight: torch.Tensor, quant: QuantSettings, device: str | torch.device) -> Any:
    """`weight` (any float dtype, any device) -> a bnb Params4bit on `device`, quantised there.

    The weight is first cast to the compute dtype, as transformers does when it loads a checkpoint with
    `dtype=compute_dtype`; the quant state's dtype (what dequantisation returns) is then the compute dtype.
    """
    import bitsandbytes as bnb

    data = weight.detach().to(dtype=quant.torch_compute_dtype).contiguous()
    param = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_type=quant.quant_type,
        compress_statistics=quant.double_quant,
    )
    return param.to(device)


def dequantize_weight(param: Any) -> torch.Tensor:
    """A Params4bit -> its dense weight (in the quant state's dtype, on its device)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(param.data, param.quant_state)


# bitsandbytes' CPU inference repacking. On a CPU with AVX512-BF16, bitsandbytes >= 0.48 repacks a Linear4bit's
# weight, permanently, the first time the layer runs with `training=False` and an input without grad; from then
# on every call goes through `gemv_4bit`, a bf16 kernel with no autograd. Our reference pass is exactly such a
# call and runs before training, so the repacking would silently drop the base weight's part of every later
# gradient, change the cached reference by the bf16 rounding, and make results depend on the host's CPU.
# Every 4-bit layer we hold is therefore kept on the plain dequantise-and-matmul path, which is the path the
# numbers of a host without the feature (and of CUDA) come from. The switch is the per-module attribute that
# bitsandbytes' own Linear4bit.forward reads; nothing is patched in bitsandbytes itself.
CPU_REPACKING_SWITCH = "support_avx512bf16_for_cpu"


def _bitsandbytes_can_repack() -> bool:
    """Whether the installed bitsandbytes has the CPU inference repacking at all (0.48 and later)."""
    import bitsandbytes.nn.modules as bnb_modules

    return hasattr(bnb_modules, "_convert_weight_packed_for_cpu")


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes Linear4bit inside `model` off the CPU inference repacking; returns how many.

    Call it before the layers' first forward. A bitsandbytes that can repack but lacks the switch this code knows
    is refused (InputError, one line naming the version): training on it would compute wrong gradients.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if not hasattr(module, CPU_REPACKING_SWITCH):
            if _bitsandbytes_can_repack():
                raise InputError(
                    f"bitsandbytes {bnb.__version__} repacks 4-bit weights for CPU inference but has no "
                    f"'{CPU_REPACKING_SWITCH}' switch to keep training layers off it: install bitsandbytes 0.50"
                )
            continue
        setattr(module, CPU_REPACKING_SWITCH, False)
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            # Only a forward before this call can have packed it: a bug in the caller, not bad input.
            raise RuntimeError(f"{name}: 4-bit weight already repacked for CPU inference before it was switched off")
        count += 1
    return count


def is_linear4bit(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def set_4bit_weight(module: torch.nn.Module, param: Any) -> None:
    """Make the Params4bit `param` the weight of the Linear4bit `module`.

    bitsandbytes keeps a second reference to the quant state on the module (`module.quant_state`, which it
    reads back when a weight lost its own, e.g. under FSDP) and a back-reference on the weight
    (`param.module`). A bare `module.weight = param` leaves the old state there: the replaced absmax stays
    alive on the device and code reading `module.quant_state` sees the old scales. Wire up both, as
    bitsandbytes' own loading does.
    """
    param.module = module
    module.weight = param
    module.quant_state = param.quant_state
    disable_cpu_repacking(module)  # a fresh weight is unpacked; keep the module from repacking it


def requantize_like(old: Any, weight: torch.Tensor) -> Any:
    """Quantise `weight` with exactly the settings of the existing Params4bit `old` (for the inplace merge,
    whose base may be a pre-quantised checkpoint with settings of its own)."""
    import bitsandbytes as bnb

    data = weight.detach().to(dtype=old.quant_state.dtype).contiguous()
    param = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        blocksize=old.blocksize,
        quant_type=old.quant_type,
        compress_statistics=old.compress_statistics,
        quant_storage=old.quant_storage,
    )
    return param.to(old.device)
