"""Reference log-probs: one no-grad pass of M_{t-1} (no adapters) over D_t, cached in the run directory.

Training then needs no reference forward at all, and no second model is ever in memory. The cache is a
safetensors file whose metadata holds the key it was computed for; the key is a hash of everything that
decides the numbers (base model files, adapter chain, quantisation and merge settings, D_t's content,
tokenisation settings, the log-prob implementation, the compute dtype). Any change recomputes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.atomic import atomic_path
from lowmem_sdpo.engine.hardware import Hardware
from lowmem_sdpo.engine.logprobs import batch_logprobs
from lowmem_sdpo.engine.reporting import Reporter
from lowmem_sdpo.engine.units import Unit, collate_kl, collate_units

KEY_METADATA = "lowmem_sdpo_cache_key"
PARTS_METADATA = "lowmem_sdpo_cache_parts"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_chain_digest(chain: list[Path]) -> list[str]:
    """One digest per adapter, in merge order (order matters for rounding, so it is part of the key)."""
    return [file_digest(Path(a) / "adapter_model.safetensors") for a in chain]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class LogpTable:
    """Per-unit summed log-probs: chosen/rejected answers, and (for KTO) the mismatched KL rows."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    kl_chosen: torch.Tensor | None = None
    kl_rejected: torch.Tensor | None = None

    def gamma_mean(self) -> float:
        """The sDPO paper's gamma: mean over D_t of (chosen logp - rejected logp)."""
        return float((self.chosen.double() - self.rejected.double()).mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"chosen": self.chosen, "rejected": self.rejected}
        if self.kl_chosen is not None and self.kl_rejected is not None:
            named |= {"kl_chosen": self.kl_chosen, "kl_rejected": self.kl_rejected}
        return {k: v.detach().float().cpu().contiguous() for k, v in named.items()}


def load_cache(path: Path, key: str, *, need_kl: bool) -> LogpTable | None:
    """The cached table if `path` holds one for exactly this key (and with KL rows when needed)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get(KEY_METADATA) != key:
                return None
            named = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged cache is recomputed, never trusted
        return None
    if need_kl and "kl_chosen" not in named:
        return None
    return LogpTable(named["chosen"], named["rejected"], named.get("kl_chosen"), named.get("kl_rejected"))


def save_cache(path: Path, key: str, parts: dict[str, Any], table: LogpTable) -> None:
    from safetensors.torch import save_file

    metadata = {KEY_METADATA: key, PARTS_METADATA: json.dumps(parts, sort_keys=True, default=str)}
    with atomic_path(path) as tmp:
        save_file(table.tensors(), str(tmp), metadata=metadata)


@torch.no_grad()
def compute_logps(
    model: nn.Module,
    units: list[Unit],
    *,
    pad_id: int,
    batch_size: int,
    hw: Hardware,
    impl: str,
    with_kl: bool,
    reporter: Reporter,
    description: str,
) -> LogpTable:
    """No-grad pass in eval mode (no dropout) over all units, `batch_size` units per forward."""
    was_training = model.training
    model.eval()
    chosen, rejected, kl_c, kl_r = [], [], [], []
    starts = range(0, len(units), batch_size)
    try:
        with reporter.task(description, total=len(units)) as advance:
            for start in starts:
                indices = list(range(start, min(start + batch_size, len(units))))
                logp, _ = batch_logprobs(
                    model, collate_units([units[i] for i in indices], pad_id), hw=hw, impl=impl
                )
                chosen.append(logp[: len(indices)].float().cpu())
                rejected.append(logp[len(indices) :].float().cpu())
                if with_kl:
                    kl, _ = batch_logprobs(model, collate_kl(units, indices, pad_id), hw=hw, impl=impl)
                    kl_c.append(kl[: len(indices)].float().cpu())
                    kl_r.append(kl[len(indices) :].float().cpu())
                advance(len(indices))
    finally:
        model.train(was_training)
    return LogpTable(
        torch.cat(chosen),
        torch.cat(rejected),
        torch.cat(kl_c) if with_kl else None,
        torch.cat(kl_r) if with_kl else None,
    )
