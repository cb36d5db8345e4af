"""Registers, spill stack and shared memory of the fused log-prob kernels, per tile config and GPU target,
as the installed Triton and ptxas build them, without a GPU.

Triton's NVIDIA backend ships ptxas and cuobjdump, so a kernel compiles for sm80 / sm86 / sm90 on any
machine. `cuobjdump -res-usage` on the cubin gives the registers per thread (REG) and the local stack a
thread spills to (STACK, 0 = no spill); Triton's metadata gives the shared memory a block needs.

What is compiled is what a launch compiles: the op's own launches (triton_logprobs.call_launches, over meta
tensors of SHAPE's sizes) go through the JIT's own binder, so unit strides become constants and sizes and
leading strides carry divisibility-by-16 hints, as they do at run time. (Compiled without that
specialisation the kernels need far less shared memory than the ones that run: 16,384 B against 49,152 B
for the default forward on sm90.)

    python benchmarks/kernel_resources.py --arch 90 80 86 --dtype bf16 fp32 --json OUT.json  # defaults + autotune set
    python benchmarks/kernel_resources.py --arch 90 --config 128,128,32,8,3 --kernels forward backward-dW

Run it with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled), under the Triton the GPU
runs (benchmarks/results/kernel_resources_compiled.json: 3.6, the GPU image's).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import git_commit, host_record, write_json_atomic

# Variants of the backward worth telling apart: a trained weight (dW product) or a frozen one, the filter
# off / the mass bound / the per-element rule. name -> (weight gradient wanted, filter mode or None)
BACKWARD_VARIANTS: dict[str, tuple[bool, str | None]] = {
    "backward-dW": (True, None),
    "backward-dW-bound": (True, "bound"),
    "backward-frozen": (False, None),
    "backward-frozen-bound": (False, "bound"),
    "backward-frozen-element": (False, "element"),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# The launch compiled: issue 13's shape (N 16384, D 4096, V 32000), every row valid but passed as a row
# index (the engine's way: HAS_ROWS). Every size and leading stride is then a multiple of 16 and the
# inner strides are 1, so the JIT specialises all of them (unit strides as constants, divisibility-by-16
# hints on the rest): the case with the most software pipelining, hence the most shared memory.
SHAPE = {"n": 16384, "d": 4096, "v": 32000}


def launches(cfg: Any, dtype: str, variant: str, shape: dict[str, int]) -> list[Any]:
    """The launch the op's own shared-memory check compiles for this variant (triton_logprobs.call_launches,
    on meta tensors of the shape's sizes: nothing is allocated)."""
    import torch

    from lowmem_sdpo_kernels.configs import OpOptions
    from lowmem_sdpo_kernels.triton_logprobs import call_launches

    dt = getattr(torch, DTYPES[dtype])
    n, d, v = shape["n"], shape["d"], shape["v"]
    hidden = torch.empty(n, d, dtype=dt, device="meta")
    weight = torch.empty(v, d, dtype=dt, device="meta")
    targets = torch.empty(n, dtype=torch.int64, device="meta")
    rows = torch.empty(n, dtype=torch.int64, device="meta")
    if variant == "forward":
        return call_launches(cfg, hidden, weight, None, targets, rows, OpOptions(), (False, False, False))
    need_w, mode = BACKWARD_VARIANTS[variant]
    # The threshold is a float argument, which the JIT never specialises: its value changes no code.
    options = OpOptions(None if mode is None else 2.0**-7, filter_mode=mode or "bound")
    return call_launches(cfg, hidden, weight, None, targets, rows, options, (True, need_w, False))[1:]


def jit_compile(launch: Any, arch: int) -> Any:
    """Compile launch as `kernel[grid](*args, **kwargs)` would on an sm{arch} card: the JIT's own binder
    specialises the arguments (constants, divisibility hints) and _pack_args turns them into the source's
    signature, constants and attributes (as JITFunction.run does before it compiles)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, target = launch.kernel, GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


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


def measure(cfg: Any, dtype: str, arch: int, variants: list[str], shape: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        (launch,) = launches(cfg, dtype, variant, shape)
        compiled = jit_compile(launch, arch)
        regs, stack = register_use(compiled.asm["cubin"])
        rows.append({"arch": arch, "dtype": dtype, "kernel": variant, **asdict(cfg),
                     "registers": regs, "spill_stack_bytes": stack, "shared_bytes": compiled.metadata.shared})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80, 86], help="compute capabilities (90 = H100)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--config", nargs="*", default=None,
                        help="BLOCK_M,BLOCK_V,BLOCK_D,WARPS,STAGES[,GROUP_M] (default: dtype defaults + autotune set)")
    parser.add_argument("--kernels", nargs="+", choices=["forward", *BACKWARD_VARIANTS],
                        default=["forward", *BACKWARD_VARIANTS])
    for name, value in SHAPE.items():
        parser.add_argument(f"--{name}", type=int, default=value, help=f"shape of the launch compiled ({value})")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (rewritten after each)")
    return parser.parse_args(argv)


def _configs(args: argparse.Namespace, dtype: str) -> list[Any]:
    import torch

    from lowmem_sdpo_kernels.configs import AUTOTUNE_TRITON_CONFIGS, TRITON_CONFIGS_BY_DTYPE, TritonConfig

    if args.config:
        return [TritonConfig(*(int(x) for x in c.split(","))) for c in args.config]
    ours = TRITON_CONFIGS_BY_DTYPE[getattr(torch, DTYPES[dtype])]
    # The autotune set is offered to half-precision inputs only (fp32 keeps its own list).
    return list(dict.fromkeys([*ours, *(AUTOTUNE_TRITON_CONFIGS if dtype != "fp32" else ())]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_resources: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    try:
        configs = {dtype: _configs(args, dtype) for dtype in args.dtype}
    except (TypeError, ValueError):
        print(f"kernel_resources: --config wants 5 or 6 comma-separated ints, got {args.config}", file=sys.stderr)
        return 2
    import triton

    shape = {name: getattr(args, name) for name in SHAPE}
    meta = {"triton": triton.__version__, "commit": git_commit(), "host": host_record(),
            "tool": "cuobjdump -res-usage (REG, STACK)",
            "shared": "CompiledKernel.metadata.shared", "shape": shape,
            "specialisation": "the JIT's own (its binder on the launch's arguments): unit strides constant, "
                              "sizes and leading strides divisible by 16, rows passed as an index"}
    rows: list[dict[str, Any]] = []
    for arch in args.arch:
        for dtype in args.dtype:
            for cfg in configs[dtype]:
                for row in measure(cfg, dtype, arch, args.kernels, shape):
                    rows.append(row)
                    print(
                        f"sm{arch} {row['dtype']} {row['kernel']:<24} {cfg.block_m}x{cfg.block_v}x{cfg.block_d} "
                        f"w{cfg.num_warps} s{cfg.num_stages} g{cfg.group_m}: {row['registers']} regs, "
                        f"{row['spill_stack_bytes']} B spill stack, {row['shared_bytes']} B shared",
                        flush=True,
                    )
                if args.json is not None:
                    write_json_atomic(args.json, {**meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
