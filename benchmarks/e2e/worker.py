"""One worker process: prepares a shape, or runs one system under the phase clock and writes its result JSON."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import loadavg, write_json_atomic

from lowmem_sdpo.host import cpu_allocator  # stdlib only: the parent still never loads torch

from .clock import PhaseClock, peak_rss_self
from .fixtures import prepare_worker
from .ours import OURS_VARIANTS, ours_worker
from .trl_system import trl_worker

Worker = Callable[[dict[str, Any], PhaseClock, dict[str, Any]], None]
# system -> its worker (settings.SYSTEMS lists them; "prepare" is the shape's set-up, run first)
WORKERS: dict[str, Worker] = {
    **dict.fromkeys(OURS_VARIANTS, ours_worker),  # each variant is a RunConfig override of the same worker
    "trl": trl_worker,
    "trl-precompute": trl_worker,
    "trl-liger": trl_worker,
}


def run_worker(system: str, spec_path: Path, result_path: Path, profile: str | None) -> int:
    spec = json.loads(spec_path.read_text())
    if system == "prepare":
        write_json_atomic(result_path, prepare_worker(spec))
        return 0
    cuda = spec["device"] == "cuda"
    if cuda:
        import torch

        torch.cuda.init()
    clock = PhaseClock(cuda=cuda)
    result: dict[str, Any] = {"system": system, "error": None, "loadavg_start": loadavg()}
    fn = WORKERS[system]
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        fn(spec, clock, result)
    except BaseException as err:  # the row says what failed (Liger on CPU, OOM, ...)
        result["error"] = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if profiler is not None:
            profiler.disable()
            Path(profile).parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(profile)
        clock.close()
    result["phases"] = clock.as_dicts()
    result["process_peak_rss_bytes"] = peak_rss_self()
    result["cpu_allocator"] = cpu_allocator()  # the malloc this worker ran on (the driver's --cpu-allocator)
    if cuda:  # the engine resets the allocator's peaks at its phase boundaries: the process's are the phases'
        for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_used_bytes"):
            result[f"process_{key}"] = max((p[key] or 0 for p in result["phases"]), default=None)
    result["loadavg_end"] = loadavg()
    write_json_atomic(result_path, result)
    return 0 if result["error"] is None else 1
