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
