"""Loading M_{t-1} for training: block linears in 4-bit NF4, everything else in the compute dtype."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.adapters import check_against_checkpoint, load_all_factors
from lowmem_sdpo.models.blocks import meta_skeleton, other_linear_names
from lowmem_sdpo.models.checkpoint import Checkpoint
from lowmem_sdpo.models.head import check_head
from lowmem_sdpo.models.merge import MERGES, Progress
from lowmem_sdpo.models.quant import QuantSettings, disable_cpu_repacking


def load_quantized(
    model_dir: Path,
    *,
    adapters: Sequence[Path] = (),
    merge: str = "exact",
    quant: QuantSettings = QuantSettings(),  # noqa: B008 - frozen dataclass, safe as a default
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
):
    """M = quantise(S + dW_1 + ... + dW_k) (merge="exact") or the compounding inplace merge.

    S is loaded by transformers' bitsandbytes integration (tensor by tensor, quantised on `device` as it
    arrives); then every module an adapter touches is rebuilt by MERGES[merge]. Embeddings, norms and
    lm_head stay in the compute dtype: the fused log-prob kernel reads lm_head's plain weight.
    """
    from transformers import AutoModelForCausalLM

    if merge not in MERGES:
        raise InputError(f"merge '{merge}': expected one of {', '.join(MERGES)}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"model {model_dir}: no config.json")
    checkpoint = Checkpoint(model_dir)
    factors = load_all_factors([Path(a) for a in adapters])  # fail on a bad adapter before the slow load
    prequantized = checkpoint.is_prequantized()
    if prequantized and factors and merge == "exact":
        raise InputError(
            f"model {model_dir} is stored in 4 bit: the exact merge needs its full-precision weights; "
            "use merge 'inplace'"
        )
    if (
        factors and not prequantized
    ):  # a 4-bit checkpoint's headers hold packed shapes: the merge checks those
        check_against_checkpoint(factors, checkpoint)

    kwargs: dict = {"dtype": quant.torch_compute_dtype, "device_map": {"": device}}
    if not prequantized:
        skip = [re.escape(n) for n in other_linear_names(meta_skeleton(str(model_dir)))]
        kwargs["quantization_config"] = quant.bnb_config(skip)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    disable_cpu_repacking(model)  # before any forward: the reference pass would otherwise repack (models/quant.py)
    model.requires_grad_(False)
    model.eval()
    if factors:
        MERGES[merge](model, checkpoint, factors, quant, device, progress)
    check_head(model)  # refuse a head the log-prob kernels cannot represent (InputError, one line)
    return model
