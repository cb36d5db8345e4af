"""--model -> a local directory with config.json and safetensors; and a cheap fingerprint of it."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

from lowmem_sdpo.data.tokenizer import BUILTIN_TOKENIZERS
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.hub import LOCAL_MODEL_HINT, hub_reachable, unreachable
from lowmem_sdpo.model_aliases import resolve_model_alias

# What a training run needs from a hub repo: configs, safetensors weights, tokenizer files (no *.bin, no
# *.gguf, no onnx exports).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def _builtin_tiny() -> Path:
    from lowmem_sdpo.models.tiny import build_tiny_model

    return build_tiny_model()


def _builtin_tiny_carry() -> Path:
    from lowmem_sdpo.models.tiny import CARRY_RECIPE, build_tiny_model

    return build_tiny_model(recipe=CARRY_RECIPE)


def _builtin_smollm2() -> Path:
    from lowmem_sdpo.models.smollm2 import build_smollm2

    return build_smollm2()


BUILTINS: dict[str, Callable[[], Path]] = {
    "builtin:tiny": _builtin_tiny,
    "builtin:tiny-carry": _builtin_tiny_carry,
    "builtin:smollm2-135m-instruct-q4": _builtin_smollm2,
}


def tokenizer_location(model: str) -> str:
    """What data.load_tokenizer should load for --model `model`: a built-in model's directory where its tokenizer
    comes out of building it (smollm2's GGUF build), else `model` itself (an alias, hub id or directory, which
    load_tokenizer resolves without downloading any weights; the tiny models' tokenizer ships with the data
    package, so they are not built for it)."""
    target = resolve_model_alias(model)
    if target in BUILTINS and target not in BUILTIN_TOKENIZERS:
        return str(BUILTINS[target]())
    return model


def _looks_like_path(target: str) -> bool:
    return target.startswith(("/", ".", "~")) or target.count("/") > 1 or "\\" in target


HubFetch = Callable[[str, str, "str | None"], Path]  # (what the user typed, repo id, revision) -> local dir


def resolve_model(model: str, revision: str | None = None, fetch: HubFetch | None = None) -> Path:
    """alias / builtin / local dir / hub id -> a directory holding config.json (and the weights).

    `revision` (a branch, tag or commit) applies to hub ids only; a run pins the commit it resolved to and
    resumes from exactly that commit. `fetch` brings a hub id's files (default: what a training run needs;
    `plan` fetches config.json alone).
    """
    target = resolve_model_alias(model)
    if target in BUILTINS:
        return BUILTINS[target]()
    local = Path(target).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return local
    if local.exists() or _looks_like_path(target):
        state = "has no config.json" if local.is_dir() else "is a file" if local.exists() else "does not exist"
        raise InputError(
            f"model '{model}': not a local directory with config.json and not a hub id ({local} {state})"
        )
    return (fetch or _download)(model, target, revision)


def _download(model: str, repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download honours HF_HOME / the HF cache and HF_HUB_OFFLINE (then it only looks in the cache).
    When the hub cannot be reached the cache alone is asked, at once, instead of the library's retries."""
    from huggingface_hub import snapshot_download

    online = hub_reachable()
    try:
        path = Path(
            snapshot_download(
                repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=not online
            )
        )
    except Exception as err:  # unknown repo, gated, offline and not cached, bad id: all one user error
        if not online:
            raise unreachable(f"model '{model}'", LOCAL_MODEL_HINT.format(repo_id=repo_id)) from err
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"model '{model}': not a local directory with config.json and not reachable on the hub "
            f"as '{repo_id}'{f' at revision {revision}' if revision else ''} ({type(err).__name__}: {reason}); "
            + LOCAL_MODEL_HINT.format(repo_id=repo_id)
        ) from err
    if not (path / "config.json").is_file():
        raise InputError(f"model '{model}': hub repo '{repo_id}' has no config.json")
    return path


SAMPLE_CHUNKS = 16  # evenly spaced probes into the tensor data of each file
SAMPLE_BYTES = 1 << 16


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file: tensor names, dtypes, shapes, offsets (not the data)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(length)


def _data_sample(path: Path) -> bytes:
    """16 x 64 KiB spread over the file (1 MiB read per file, whatever its size)."""
    size = path.stat().st_size
    chunks = []
    with path.open("rb") as f:
        for i in range(SAMPLE_CHUNKS):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLE_CHUNKS - 1)))
            chunks.append(f.read(SAMPLE_BYTES))
    return b"".join(chunks)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and each safetensors file's name, size, header and a 1 MiB data sample.

    Deliberately not over all the weights: hashing a 21 GB checkpoint would take minutes on every run. A
    retrained or re-exported model changes every tensor, so a sample of the data catches it; so does a
    change of dtype/shape (header) or size. A hand edit of a few values between the probes is not caught,
    an accepted trade-off for a cache key.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(model_dir.glob("*.safetensors")):
        entry = {"name": path.name, "size": path.stat().st_size}
        digest.update(json.dumps(entry, sort_keys=True).encode())
        digest.update(_safetensors_header(path))
        digest.update(_data_sample(path))
    return digest.hexdigest()
