"""The sDPO pipeline: materialise M_{t-1} in 4 bit, cache its reference log-probs on D_t, train a fresh LoRA,
save, merge, repeat. `run_sdpo(RunConfig(...))` is what `lowmem-sdpo run` calls.

Its stages live in subpackages: `reference/` (the reference pass and its cache, held-out figures), `training/`
(the trainer, objective, optimiser, schedule, checkpoints) and `rundir/` (the run directory's files, keys and
resume); `config.py` holds the settings, `units.py` the token units both stages read, `run.py` the pipeline.
What every pipeline shares (hardware, ranks, reporting, failures, model holders) is in `lowmem_sdpo.runtime`.

The names below are imported on first use (PEP 562), so that `lowmem_sdpo.engine.config` -- the settings and
their checks, torch-free -- can be imported by the CLI without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowmem_sdpo.engine.config import RunConfig, build_config, read_config_file
    from lowmem_sdpo.engine.run import run_sdpo
    from lowmem_sdpo.engine.rundir.layout import step_dir

# name -> the module that defines it
_HOMES: dict[str, str] = {
    "RunConfig": "config",
    "build_config": "config",
    "read_config_file": "config",
    "run_sdpo": "run",
    "step_dir": "rundir.layout",
}
__all__ = ["RunConfig", "build_config", "read_config_file", "run_sdpo", "step_dir"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lowmem_sdpo.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lowmem_sdpo.engine.{home}"), name)
