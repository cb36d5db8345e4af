"""Mid-step training checkpoints: everything an interrupted step needs to continue bit for bit.

step-t/checkpoint/ (replaced atomically as a whole directory):
  adapter.safetensors  the LoRA factors being trained
  optimizer.pt         optimiser state;  scheduler.pt  the LR schedule's position
  rng.pt               torch CPU (and CUDA) and Python RNG states at the optimiser-step boundary (rank 0's;
                       a data-parallel run adds the other ranks' under "other_ranks")
  scaler.pt            fp16 only: the GradScaler's scale and growth tracker
  state.json           optimiser steps done (which fixes the data position and the metrics lines kept) and
                       the optimiser's class (another class cannot load this state: refused on resume)
The RNG states are those of the boundary, not of the moment of the save: an interrupt in the middle of
gradient accumulation discards the partial accumulation and resumes exactly at the boundary.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.atomic import atomic_dir

CHECKPOINT_DIR = "checkpoint"


@dataclass
class RngState:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    python: Any

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return cls(torch.get_rng_state(), cuda, random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)

    def to_dict(self) -> dict[str, Any]:
        return {"torch_cpu": self.torch_cpu, "torch_cuda": self.torch_cuda, "python": self.python}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RngState:
        return cls(saved["torch_cpu"], saved["torch_cuda"], saved["python"])


@dataclass
class TrainState:
    opt_steps_done: int  # also the data position and the number of metrics.jsonl lines kept on resume
    optimizer: str = ""  # the optimiser's class name ("" in checkpoints written before it was recorded)


@dataclass
class LoadedCheckpoint:
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: RngState
    state: TrainState
    scaler: dict | None = None
    other_ranks: list[RngState] | None = None  # ranks 1.. of a data-parallel run, in rank order

    def rng_for(self, rank: int) -> RngState | None:
        """Rank `rank`'s saved RNG state; None for a rank the saving run did not have."""
        if rank == 0:
            return self.rng
        others = self.other_ranks or []
        return others[rank - 1] if rank - 1 < len(others) else None


def save_checkpoint(
    step_dir: Path,
    *,
    adapter_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng: RngState,
    state: TrainState,
    scaler: Any = None,
    other_ranks: list[RngState] | None = None,
) -> None:
    from safetensors.torch import save_file

    with atomic_dir(step_dir / CHECKPOINT_DIR) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in adapter_state.items()},
            str(tmp / "adapter.safetensors"),
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        saved_rng = rng.to_dict()
        if other_ranks:
            saved_rng["other_ranks"] = [r.to_dict() for r in other_ranks]
        torch.save(saved_rng, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n")


def load_checkpoint(step_dir: Path) -> LoadedCheckpoint | None:
    """The step's checkpoint, or None when there is none."""
    from safetensors.torch import load_file

    path = step_dir / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        return None
    adapter = load_file(str(path / "adapter.safetensors"))
    optimizer = torch.load(path / "optimizer.pt", weights_only=False)
    scheduler = torch.load(path / "scheduler.pt", weights_only=False)
    rng = torch.load(path / "rng.pt", weights_only=False)
    state = TrainState(**json.loads((path / "state.json").read_text()))
    scaler = torch.load(path / "scaler.pt", weights_only=False) if (path / "scaler.pt").is_file() else None
    others = [RngState.from_dict(r) for r in rng.get("other_ranks", [])]
    return LoadedCheckpoint(
        adapter, optimizer, scheduler, RngState.from_dict(rng), state, scaler, other_ranks=others or None
    )
