"""Reference log-probs: one no-grad pass of M_{t-1} (no adapters) over D_t, cached in the run directory.

Training then needs no reference forward at all, and no second model is ever in memory. The cache is a
safetensors file whose metadata holds the key it was computed for; the key is a hash of everything that
decides the numbers (base model files, adapter chain, quantisation and merge settings, D_t's content,
tokenisation settings, the log-prob implementation, the compute dtype). Any change recomputes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.atomic import atomic_path
from lowmem_sdpo.engine.units import Unit, collate_kl, collate_units, kl_rows
from lowmem_sdpo.runtime.distributed import SINGLE, Ranks
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.logprobs import batch_logprobs
from lowmem_sdpo.runtime.reporting import Reporter

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


def cached_logps(
    path: Path, parts: dict[str, Any], compute: Callable[[], LogpTable], *, need_kl: bool, ranks: Ranks = SINGLE
) -> tuple[LogpTable, bool]:
    """(the table for `parts`, whether it came from the cache at `path`). `compute` runs when the cache is
    missing, stale or damaged, on every rank together unless every rank can read it (the pass is sharded);
    rank 0 alone writes the new cache."""
    key = cache_key(parts)
    cached = load_cache(path, key, need_kl=need_kl)
    if ranks.all_(cached is not None) and cached is not None:
        return cached, True
    table = compute()
    if ranks.is_main:
        save_cache(path, key, parts, table)
    return table, False


def unit_length(units: list[Unit], index: int) -> int:
    """Tokens of unit `index`'s longest row, chosen or rejected: the width it pads its batch to."""
    unit = units[index]
    return max(len(unit.chosen_prompt) + len(unit.chosen), len(unit.rejected_prompt) + len(unit.rejected))


def kl_length(units: list[Unit], index: int) -> int:
    """Tokens of unit `index`'s longest mismatched KL row (its answers under the next unit's prompts)."""
    return max(len(prompt) + len(answer) for prompt, answer in kl_rows(units, index))


def collate_answers(units: list[Unit], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    return collate_units([units[i] for i in indices], pad_id)


@dataclass(frozen=True)
class RowKind:
    """One kind of row the reference pass scores: how long a unit's rows are, how a batch of them collates."""

    length: Callable[[list[Unit], int], int]
    collate: Callable[[list[Unit], list[int], int], dict[str, torch.Tensor]]


ROW_KINDS: dict[str, RowKind] = {
    "answers": RowKind(unit_length, collate_answers),
    # collate_kl takes the original indices and pairs each unit's answers with the prompts of the unit after
    # it in `units` (not in the batch), so the KL rows stay aligned with their units in any batch order.
    "kl": RowKind(kl_length, collate_kl),
}


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into batches of `batch_size`: neighbours in the order have
    similar lengths, so each batch pads little. Longest first so that the pass's peak memory comes in its
    first forward (an out-of-memory shows at once, not minutes in); ties keep data order (a stable sort)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padded_width_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Token positions a pass over `batches` computes per side: each batch is as wide as its longest entry."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def _score_rows(
    model: nn.Module,
    units: list[Unit],
    kind: str,
    *,
    pad_id: int,
    batch_size: int,
    hw: Hardware,
    impl: str,
    advance: Callable[..., None],
    ranks: Ranks = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-side, second-side) summed log-probs [len(units)] fp32 on CPU, in the units' own order.

    Over several ranks each takes every world-th batch of the one plan (the very batches, padded alike, that
    one process would run: the table is the same bit for bit on any number of ranks), and the sum over ranks
    of the tables, zero where a rank did not score, gathers them exactly (x + 0 is x)."""
    rows = ROW_KINDS[kind]
    lengths = [rows.length(units, i) for i in range(len(units))]
    scored = torch.zeros(2, len(units), dtype=torch.float32)
    first, second = scored[0], scored[1]
    mine = 0
    for indices in plan_batches(lengths, batch_size)[ranks.rank :: ranks.world]:
        logp, _ = batch_logprobs(model, rows.collate(units, indices, pad_id), hw=hw, impl=impl)
        logp = logp.float().cpu()
        where = torch.tensor(indices)
        first[where] = logp[: len(indices)]  # back to the units' order
        second[where] = logp[len(indices) :]
        advance(len(indices))
        mine += len(indices)
    ranks.sum_(scored)
    advance(len(units) - mine)  # the other ranks' share, gathered
    return scored[0].clone(), scored[1].clone()


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
    ranks: Ranks = SINGLE,
) -> LogpTable:
    """No-grad pass in eval mode (no dropout) over all units, `batch_size` units per forward (the reference
    batch size, engine.config.reference_batch_size), in length-sorted batches; the table is in the units'
    order. With `with_kl` the KL rows go through a second pass, sorted by their own lengths. Every rank of
    `ranks` calls it; each scores its share of the batches and all get the whole table."""
    was_training = model.training
    model.eval()
    kinds = ["answers", "kl"] if with_kl else ["answers"]
    scored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with reporter.task(description, total=len(units) * len(kinds)) as advance:
            for kind in kinds:
                scored[kind] = _score_rows(
                    model,
                    units,
                    kind,
                    pad_id=pad_id,
                    batch_size=batch_size,
                    hw=hw,
                    impl=impl,
                    advance=advance,
                    ranks=ranks,
                )
    finally:
        model.train(was_training)
    kl = scored.get("kl", (None, None))
    return LogpTable(*scored["answers"], *kl)
