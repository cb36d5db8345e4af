"""--model -> its config and architecture on the meta device, without reading (or downloading) any weight.

A hub id costs one download, config.json (huggingface_hub's cache and HF_HUB_OFFLINE apply); a local directory
needs only its config.json; aliases resolve as they do for `run` (so `solar-10.7b-sft` is refused the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.quant import DTYPES

CONFIG_FILE = "config.json"


@dataclass
class ModelSource:
    name: str  # what the user typed
    config_dir: Path  # the directory holding config.json
    config: Any  # transformers PretrainedConfig


def _hub_config_dir(model: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=CONFIG_FILE, revision=revision)).parent
    except Exception as err:  # unknown repo, gated, offline and not cached, malformed id: one user error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"model '{model}': not a local directory with {CONFIG_FILE} and its {CONFIG_FILE} is not "
            f"reachable on the hub as '{repo_id}' ({type(err).__name__}: {reason})"
        ) from err


def config_dir_for(model: str, revision: str | None = None) -> Path:
    """The directory holding `model`'s config.json: local, built in (tiny), or config.json alone from the hub."""
    from lowmem_sdpo.models.resolve import resolve_model

    return resolve_model(model, revision, fetch=_hub_config_dir)


def read_source(model: str, revision: str | None = None) -> ModelSource:
    from transformers import AutoConfig

    config_dir = config_dir_for(model, revision)
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
    except (ValueError, OSError, KeyError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"model '{model}': cannot read {config_dir / CONFIG_FILE} ({reason})") from err
    return ModelSource(model, config_dir, config)


def meta_model(source: ModelSource, compute_dtype: str) -> nn.Module:
    """The architecture with no memory behind it, its floating-point parameters in `compute_dtype` as
    load_quantized loads them (dtype=compute dtype), buffers in the dtypes the model's own code gives them."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(source.config, dtype=DTYPES[compute_dtype])
    except (ValueError, KeyError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"model '{source.name}': not a causal LM transformers can build ({reason})") from err
