"""Benchmarks only (benchmarks/ab_cpu_heap.py): the same C-heap setting for any Python process, ours or TRL's.

Put this folder first on PYTHONPATH and Python imports this file at start-up, before anything else:
- LOWMEM_SDPO_AB_MALLOPT="mmap_threshold=131072,trim_threshold=..." calls glibc's mallopt with each pair, so a
  TRL worker gets exactly the setting `lowmem-sdpo run` applies to itself (runtime/cpu_heap.py).
- LOWMEM_SDPO_AB_RUSAGE_DIR=DIR writes this process's getrusage (CPU seconds, page faults) and VmHWM to
  DIR/<pid>.json at exit, so the harness reads each worker's own figures.
Stdlib only, and nothing happens without the variables. Environment-read settings (GLIBC_TUNABLES,
THP_MEM_ALLOC_ENABLE) are set by the harness in the child's environment.
"""

import atexit
import ctypes
import json
import os
import resource
import sys
import time

# glibc <malloc.h>
_PARAMS = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3, "mmap_max": -4, "arena_max": -8}

_spec = os.environ.get("LOWMEM_SDPO_AB_MALLOPT", "")
if _spec:
    _libc = ctypes.CDLL("libc.so.6")
    for _item in _spec.split(","):
        _name, _value = _item.split("=")
        if not _libc.mallopt(ctypes.c_int(_PARAMS[_name]), ctypes.c_int(int(_value))):
            raise SystemExit(f"LOWMEM_SDPO_AB_MALLOPT: glibc refused {_name}={_value}")

_dir = os.environ.get("LOWMEM_SDPO_AB_RUSAGE_DIR")
if _dir:
    _started = time.perf_counter()

    def _write_rusage() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        hwm = None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        record = {
            "argv": sys.argv[:4],
            "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime,
            "minflt": usage.ru_minflt,
            "majflt": usage.ru_majflt,
            "vm_hwm_bytes": hwm,
            "wall_s": time.perf_counter() - _started,
            "loadavg_end": list(os.getloadavg()),
        }
        with open(os.path.join(_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)

    atexit.register(_write_rusage)
