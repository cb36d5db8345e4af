"""The sDPO engine: materialise M_{t-1} in 4 bit, cache its reference log-probs on D_t, train a fresh LoRA,
save, merge, repeat. `run_sdpo(RunConfig(...))` is what `lowmem-sdpo run` calls.

The names below are imported on first use (PEP 562), so that `lowmem_sdpo.engine.config` -- the settings and
their checks, torch-free -- can be imported by the CLI without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowmem_sdpo.engine.config import RunConfig, build_config, read_config_file
    from lowmem_sdpo.engine.failures import NonFiniteLoss, OutOfMemory, RunInterrupted, TrainingStopped
    from lowmem_sdpo.engine.reporting import Reporter
    from lowmem_sdpo.engine.run import run_sdpo
    from lowmem_sdpo.engine.rundir import step_dir

# name -> the module that defines it
_HOMES: dict[str, str] = {
    "RunConfig": "config",
    "build_config": "config",
    "read_config_file": "config",
    "NonFiniteLoss": "failures",
    "OutOfMemory": "failures",
    "RunInterrupted": "failures",
    "TrainingStopped": "failures",
    "Reporter": "reporting",
    "run_sdpo": "run",
    "step_dir": "rundir",
}
__all__ = [
    "NonFiniteLoss",
    "OutOfMemory",
    "Reporter",
    "RunConfig",
    "RunInterrupted",
    "TrainingStopped",
    "build_config",
    "read_config_file",
    "run_sdpo",
    "step_dir",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lowmem_sdpo.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lowmem_sdpo.engine.{home}"), name)
