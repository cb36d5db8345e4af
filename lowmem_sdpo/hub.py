"""The Hugging Face hub, asked once whether it can be reached before any download starts.

Without this, an offline machine meets each library's own retry policy: huggingface_hub's and datasets'
back-off loops print a dozen "Retrying" lines over 20-55 s before the error. Here a hub id on an offline
machine costs one TCP connect (HUB_TIMEOUT_S at most), then the cache is tried, then one line that names
the local alternative. With HF_HUB_OFFLINE=1 the libraries look in their cache only and fail fast on their
own, so nothing is probed.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from lowmem_sdpo.errors import InputError

HUB_TIMEOUT_S = 3.0
# What to give instead of a model hub id that cannot be fetched (every command says the same).
LOCAL_MODEL_HINT = (
    "give a local directory with config.json instead (e.g. `huggingface-cli download {repo_id} --local-dir DIR` "
    "on a machine with access)"
)
DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (huggingface_hub's and datasets' own switch) is set."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """False when offline mode is on or the hub's host does not accept a connection (asked once a process)."""
    return not hub_offline() and _reachable(*hub_host())


def unreachable(subject: str, alternative: str) -> InputError:
    """The one line for a hub id that cannot be fetched: `subject` names it (model 'x'), `alternative` says
    what local thing to give instead."""
    host, _ = hub_host()
    why = (
        "HF_HUB_OFFLINE is set (no hub access) and it is not in the cache"
        if hub_offline()
        else f"the hub ({host}) cannot be reached and it is not in the cache"
    )
    return InputError(f"{subject}: {why}; {alternative}")
