#!/usr/bin/env python
"""The GPU pass's first command: in seconds, is everything the pass needs on this machine?

    python benchmarks/preflight.py --out OUT/preflight.json [--need-gpu]

Checks, each one line in the JSON and on stdout: the GPU (nvidia-smi, and torch sees CUDA), every import the
pass runs (torch, triton, transformers, peft, bitsandbytes, liger_kernel, cut_cross_entropy), and what Triton
needs to build its launcher at the first kernel launch: a C compiler and Python.h (a one-line C file that
includes Python.h is compiled, -fsyntax-only). Exit 1 when any check fails, after writing the JSON, so the pass
stops at once instead of failing minutes later; exit 0 when all pass.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The modules the pass imports, by the name they are imported under.
MODULES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "cut_cross_entropy")
# Where Triton 3.6 looks for a C compiler (triton/runtime/build.py): $CC, else gcc, else clang.
COMPILERS = ("gcc", "clang")


def check_module(name: str) -> tuple[bool, str]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # an import that fails for any reason fails the pass
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return True, str(getattr(module, "__version__", "present"))


def c_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((path for name in COMPILERS if (path := shutil.which(name))), None)


def check_compiler() -> tuple[bool, str]:
    cc = c_compiler()
    return (True, cc) if cc else (False, f"no C compiler: $CC unset and none of {', '.join(COMPILERS)} on PATH")


def check_python_h() -> tuple[bool, str]:
    # The include directory as Triton's build picks it (Debian's posix_local scheme read as posix_prefix).
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not (Path(include) / "Python.h").is_file():
        return False, f"{include}/Python.h is missing (python3-dev)"
    cc = c_compiler()
    if cc is None:
        return False, "no C compiler to try it with"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <Python.h>\nint main(void) { return Py_IsInitialized(); }\n")
        proc = subprocess.run([cc, "-fsyntax-only", f"-I{include}", str(src)], capture_output=True, text=True,
                              timeout=60)
    if proc.returncode != 0:
        return False, f"{cc} cannot compile against {include}/Python.h: {proc.stderr.strip()[:200]}"
    return True, f"{include}/Python.h"


def check_nvidia_smi() -> tuple[bool, str]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return False, "nvidia-smi is not on PATH"
    query = "--query-gpu=name,memory.total,driver_version"
    proc = subprocess.run([tool, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    out = (proc.stdout or proc.stderr).strip()
    return proc.returncode == 0, out.splitlines()[0] if out else f"exit {proc.returncode}"


def check_cuda() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    smem = getattr(props, "shared_memory_per_block_optin", None)
    return True, (f"{props.name}, sm{props.major}{props.minor}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
                  f"{smem} B shared memory per block, torch CUDA {torch.version.cuda}")


def checks(need_gpu: bool) -> dict[str, Callable[[], tuple[bool, str]]]:
    found: dict[str, Callable[[], tuple[bool, str]]] = {}
    if need_gpu:
        found["nvidia-smi"] = check_nvidia_smi
    found |= {f"import {name}": (lambda name=name: check_module(name)) for name in MODULES}
    found["C compiler"] = check_compiler
    found["Python.h"] = check_python_h
    if need_gpu:
        found["torch CUDA"] = check_cuda
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--need-gpu", action="store_true", help="also check nvidia-smi and torch.cuda")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    for name, check in checks(args.need_gpu).items():
        ok, detail = check()
        results.append({"check": name, "ok": ok, "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    failed = [r["check"] for r in results if not r["ok"]]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps({"python": sys.version.split()[0], "passed": not failed, "failed": failed,
                                   "checks": results}, indent=2) + "\n")
        os.replace(tmp, args.out)
    if failed:
        print(f"preflight: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
