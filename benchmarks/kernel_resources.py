"""Registers, spill stack and shared memory of the fused log-prob kernels, per tile config and GPU target,
as the installed Triton and ptxas build them, without a GPU.

Triton's NVIDIA backend ships ptxas and cuobjdump, so a kernel compiles for sm80 / sm86 / sm90 on any
machine. `cuobjdump -res-usage` on the cubin gives the registers per thread (REG) and the local stack a
thread spills to (STACK, 0 = no spill); Triton's metadata gives the shared memory a block needs.

    python benchmarks/kernel_resources.py                      # the dtype defaults and the autotune set
    python benchmarks/kernel_resources.py --arch 90 --config 128,128,32,8,3 --json out.json

Run it with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Variants of the backward worth telling apart: a trained weight (dW product) or a frozen one, the filter
# off / the mass bound / the per-element rule. name -> (COMPUTE_DW, FILTER code)
BACKWARD_VARIANTS: dict[str, tuple[bool, int]] = {
    "backward-dW": (True, 0),
    "backward-dW-bound": (True, 1),
    "backward-frozen": (False, 0),
    "backward-frozen-bound": (False, 1),
    "backward-frozen-element": (False, 2),
}
ELEMENT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
SCALARS_I32 = {"M", "V", "D", "n_splits", "tiles_per_split"}
SCALARS_F32 = {"thr_dh", "thr_split", "thr_dw", "scale", "softcap", "inv_softcap"}


def _signature(kernel: Any, elt: str) -> dict[str, str]:
    """Triton types of the runtime arguments: H, W, B in the input dtype; targets and rows int64; every
    other upper-case pointer fp32; sizes and strides int32 (a launch with tensors under 2**31 elements)."""
    typed = {"H": f"*{elt}", "W": f"*{elt}", "B": f"*{elt}", "T": "*i64", "ROWS": "*i64"}
    sig: dict[str, str] = {}
    for name in kernel.arg_names:
        if name in typed:
            sig[name] = typed[name]
        elif name in SCALARS_I32 or name.startswith("stride"):
            sig[name] = "i32"
        elif name in SCALARS_F32:
            sig[name] = "fp32"
        elif name.isupper() and name not in ("M", "V", "D"):
            sig[name] = "*fp32"
    return sig


def compile_kernel(kernel: Any, cfg: Any, elt: str, arch: int, constants: dict[str, Any]) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    const = {
        "BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d, "GROUP_M": cfg.group_m,
        "DOT_PRECISION": "ieee" if elt == "fp32" else "tf32", "HAS_ROWS": True,
        "HAS_BIAS": False, "HAS_SCALE": False, "HAS_SOFTCAP": False, **constants,
    }
    sig = _signature(kernel, elt)
    sig.update({name: "constexpr" for name in const})
    missing = [name for name in kernel.arg_names if name not in sig]
    if missing:
        raise ValueError(f"kernel_resources: no type for {kernel.__name__} arguments {missing}")
    src = ASTSource(kernel, sig, {(kernel.arg_names.index(n),): v for n, v in const.items()})
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def register_use(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill stack bytes per thread) from cuobjdump -res-usage."""
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"kernel_resources: no REG/STACK in cuobjdump output: {out[:200]!r}")
    return int(found.group(1)), int(found.group(2))


def measure(cfg: Any, elt: str, arch: int, variants: list[str]) -> list[dict[str, Any]]:
    from lowmem_sdpo_kernels.triton_logprobs import _backward_kernel, _forward_kernel

    rows = []
    for variant in variants:
        if variant == "forward":
            kernel, const = _forward_kernel, {}
        else:
            need_w, code = BACKWARD_VARIANTS[variant]
            kernel, const = _backward_kernel, {"COMPUTE_DH": True, "COMPUTE_DW": need_w, "COMPUTE_DB": False,
                                               "FILTER": code}
        compiled = compile_kernel(kernel, cfg, elt, arch, const)
        regs, stack = register_use(compiled.asm["cubin"])
        rows.append({"arch": arch, "dtype": elt, "kernel": variant, **asdict(cfg),
                     "registers": regs, "spill_stack_bytes": stack, "shared_bytes": compiled.metadata.shared})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100)")
    parser.add_argument("--dtype", choices=sorted(ELEMENT), default="bf16")
    parser.add_argument("--config", nargs="*", default=None,
                        help="BLOCK_M,BLOCK_V,BLOCK_D,WARPS,STAGES[,GROUP_M] (default: dtype defaults + autotune set)")
    parser.add_argument("--kernels", nargs="+", choices=["forward", *BACKWARD_VARIANTS],
                        default=["forward", *BACKWARD_VARIANTS])
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_resources: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    import torch

    from lowmem_sdpo_kernels.configs import AUTOTUNE_TRITON_CONFIGS, TRITON_CONFIGS_BY_DTYPE, TritonConfig

    if args.config:
        try:
            configs = [TritonConfig(*(int(x) for x in c.split(","))) for c in args.config]
        except (TypeError, ValueError):
            print(f"kernel_resources: --config wants 5 or 6 comma-separated ints, got {args.config}", file=sys.stderr)
            return 2
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        configs = list(dict.fromkeys([*TRITON_CONFIGS_BY_DTYPE[dtype], *AUTOTUNE_TRITON_CONFIGS]))
    rows = []
    for arch in args.arch:
        for cfg in configs:
            for row in measure(cfg, ELEMENT[args.dtype], arch, args.kernels):
                rows.append(row)
                print(
                    f"sm{arch} {row['dtype']} {row['kernel']:<24} {cfg.block_m}x{cfg.block_v}x{cfg.block_d} "
                    f"w{cfg.num_warps} s{cfg.num_stages} g{cfg.group_m}: {row['registers']} regs, "
                    f"{row['spill_stack_bytes']} B spill stack, {row['shared_bytes']} B shared",
                    flush=True,
                )
    if args.json is not None:
        import triton

        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                capture_output=True, text=True).stdout.strip() or None
        meta = {"triton": triton.__version__, "commit": commit, "tool": "cuobjdump -res-usage (REG, STACK)"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
