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

    from lowmem_sdpo.hub import LOCAL_MODEL_HINT, hub_reachable, unreachable

    online = hub_reachable()
    try:
        return Path(
            hf_hub_download(repo_id=repo_id, filename=CONFIG_FILE, revision=revision, local_files_only=not online)
        ).parent
    except Exception as err:  # unknown repo, gated, offline and not cached, malformed id: one user error
        if not online:
            raise unreachable(f"model '{model}'", LOCAL_MODEL_HINT.format(repo_id=repo_id)) from err
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"model '{model}': not a local directory with {CONFIG_FILE} and its {CONFIG_FILE} is not "
            f"reachable on the hub as '{repo_id}' ({type(err).__name__}: {reason}); "
            + LOCAL_MODEL_HINT.format(repo_id=repo_id)
        ) from err


def config_dir_for(model: str, revision: str | None = None) -> Path:
    """The directory holding `model`'s config.json: local, built in (tiny), or config.json alone from the hub."""
    from lowmem_sdpo.models.resolve import resolve_model

    return resolve_model(model, revision, fetch=_hub_config_dir)


# The sizes the plan is computed from, each under the names architectures give it. transformers fills a
# missing one with its class default (Llama: 32 layers, a 32000 vocabulary), which would make the plan a
# figure for another model labelled "exact": a config.json must state each size its class has.
SIZE_FIELDS: tuple[tuple[str, ...], ...] = (
    ("hidden_size", "n_embd", "d_model"),
    ("num_hidden_layers", "n_layer", "num_layers"),
    ("num_attention_heads", "n_head", "num_heads"),
    ("intermediate_size", "n_inner", "ffn_dim"),
    ("vocab_size",),
)


def check_sizes(model: str, path: Path, raw: dict[str, Any], config: Any) -> None:
    """Every size the plan reads is in config.json itself, not a transformers default."""
    for names in SIZE_FIELDS:
        used = [n for n in names if getattr(config, n, None) is not None]
        if used and not any(n in raw for n in names):
            raise InputError(
                f"model '{model}': {path} has no '{used[0]}' (the plan needs it; expected an integer, "
                f"not the {type(config).__name__} default {getattr(config, used[0])})"
            )


def check_heads(model: str, path: Path, raw: dict[str, Any]) -> None:
    """The heads divide the hidden size when no head_dim is given (before transformers' own check, which
    raises a validation error of its own kind)."""
    hidden = next((raw[n] for n in SIZE_FIELDS[0] if isinstance(raw.get(n), int)), None)
    heads = next((raw[n] for n in SIZE_FIELDS[2] if isinstance(raw.get(n), int)), None)
    if not raw.get("head_dim") and hidden and heads and hidden % heads:
        raise InputError(
            f"model '{model}': {path}: hidden size {hidden} is not a multiple of the {heads} attention heads "
            "(and no head_dim is given)"
        )


def read_source(model: str, revision: str | None = None) -> ModelSource:
    import json

    from transformers import AutoConfig

    config_dir = config_dir_for(model, revision)
    path = config_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise InputError(f"model '{model}': cannot read {path} ({err})") from err
    if not isinstance(raw, dict):
        raise InputError(f"model '{model}': {path}: expected a JSON object")
    check_heads(model, path, raw)
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
    except Exception as err:  # transformers' config errors have no common base: each is this one user error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"model '{model}': cannot read {path} ({reason})") from err
    check_sizes(model, path, raw, config)
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
