"""The sDPO engine: materialise M_{t-1} in 4 bit, cache its reference log-probs on D_t, train a fresh LoRA,
save, merge, repeat. `run_sdpo(RunConfig(...))` is what `lowmem-sdpo run` calls."""

from lowmem_sdpo.engine.config import RunConfig, build_config, read_config_file
from lowmem_sdpo.engine.failures import NonFiniteLoss, OutOfMemory, RunInterrupted, TrainingStopped
from lowmem_sdpo.engine.reporting import Reporter
from lowmem_sdpo.engine.run import run_sdpo
from lowmem_sdpo.engine.rundir import step_dir

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
