"""What bounding the C heap costs on CPU, per way of bounding it (issue 28): page faults, CPU seconds, RSS.

`lowmem-sdpo run` fixes glibc's mmap threshold on CPU (runtime/cpu_heap.py) so that freed activations go back to
the system; each large tensor is then a fresh mapping, zeroed page by page on first touch. This script measures
that price per heap variant (VARIANTS: mallopt settings and environment variables read at process start), each
in a fresh process, interleaved over `--repeats` rounds so that the shared host's load falls on all alike.

Mode `step` (default): a process loads the model as `run` does (NF4, fp32 compute, bitsandbytes' CPU repacking
off), runs a reference pass (no grad, 2 x batch pairs), puts a LoRA on it with checkpointing and runs
`--steps` optimiser steps (forward + backward of one micro-batch, AdamW) on `--batch-size` pairs whose rows are
all `--length` tokens. Step 1 warms up (AdamW's state is made there) and sets the process's RSS peak; the later
steps are the measured ones: per step CPU seconds (user + sys of the process), minor page faults, wall.

Mode `e2e`: whole training runs on real-language pairs, ours through the CLI (`lowmem-sdpo run`, one sDPO step,
`--no-bound-cpu-heap --cpu-allocator glibc` so that the variant alone sets the heap) and TRL through `bench_e2e.py --systems trl`
(its DPOTrainer worker, `--cpu-allocator glibc`), every process started with the variant by `benchmarks/heap_hook/sitecustomize.py`.
Recorded per run: wall, user + sys seconds, minor faults and VmHWM of the worker process itself.

    PYTHONPATH=.:kernels .venv/bin/python benchmarks/ab_cpu_heap.py --model ~/.cache/lowmem-sdpo/smollm2-... \\
        --variants glibc mmap-128k mmap-128k-thp --repeats 2 --out benchmarks/results/ab_cpu_heap_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import write_json_atomic

HERE = Path(__file__).resolve().parent
HOOK = HERE / "heap_hook"
MIB = 2**20
PROMPT_TOKENS = 64
# glibc's mallopt parameter names the hook knows (benchmarks/heap_hook/sitecustomize.py).
MALLOPT_NAMES = ("trim_threshold", "top_pad", "mmap_threshold", "mmap_max", "arena_max")


@dataclass(frozen=True)
class Variant:
    """One way to run the C heap: glibc mallopt settings (applied at interpreter start by the hook) and
    environment variables (read by glibc at exec, or by torch at its first allocation)."""

    what: str
    mallopt: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    # Step mode: the mmap threshold while loss.backward() runs (the recompute and the backward), set back to
    # mallopt's mmap_threshold for the next forward.
    backward_mmap_threshold: int | None = None
    # Step mode: malloc_trim(0) after each backward (glibc hands the heap's free pages back to the system).
    trim_after_backward: bool = False
    # An allocator of lowmem_sdpo.allocators.ALLOCATORS put in place of glibc's malloc (LD_PRELOAD):
    # its library is found on this system when the variant runs, as `run --cpu-allocator` finds it.
    preload: str | None = None


_THP_GLIBC = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
_THP_TORCH = {"THP_MEM_ALLOC_ENABLE": "1"}
VARIANTS: dict[str, Variant] = {
    "glibc": Variant(
        "glibc's default: the mmap threshold rises with every freed mapping, the heap keeps frees"
    ),
    "mmap-128k": Variant("run's setting: mmap threshold fixed at 128 KiB", {"mmap_threshold": 128 * 1024}),
    "mmap-128k-thp": Variant(
        "run's setting, and glibc asks for transparent huge pages on its mappings (glibc.malloc.hugetlb=1)",
        {"mmap_threshold": 128 * 1024},
        _THP_GLIBC,
    ),
    "mmap-128k-torch-thp": Variant(
        "run's setting, and torch madvises tensors of 2 MiB or more for huge pages (THP_MEM_ALLOC_ENABLE=1)",
        {"mmap_threshold": 128 * 1024},
        _THP_TORCH,
    ),
    # Allocators that keep freed blocks by size class and hand whole pages back on a timer (jemalloc) or
    # on demand (tcmalloc): loaded with LD_PRELOAD (measured with Debian's libjemalloc2 / libtcmalloc-minimal4),
    # no mallopt.
    "jemalloc": Variant(
        "jemalloc 5 in place of glibc's malloc (LD_PRELOAD), its defaults (dirty pages purged after 10 s)",
        preload="jemalloc",
    ),
    "jemalloc-1s": Variant(
        "jemalloc 5 (LD_PRELOAD), dirty pages purged after 1 s, none kept muzzy",
        env={"MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"},
        preload="jemalloc",
    ),
    "tcmalloc": Variant(
        "gperftools' tcmalloc (minimal) in place of glibc's malloc (LD_PRELOAD), its defaults",
        preload="tcmalloc",
    ),
    "mmap-5m": Variant(
        "mmap threshold fixed at 5 MiB (hidden-size activations, 4.5 MiB here, from the heap), trim 64 MiB",
        {"mmap_threshold": 5 * MIB, "trim_threshold": 64 * MIB},
    ),
    "mmap-128k-bwd-32m": Variant(
        "mmap threshold 128 KiB in the forward (the checkpointed inputs get their own mappings), 32 MiB (the "
        "most glibc takes) in the backward, whose temporaries then reuse the heap",
        {"mmap_threshold": 128 * 1024},
        backward_mmap_threshold=32 * MIB,
    ),
    "mmap-128k-bwd-32m-trim": Variant(
        "as mmap-128k-bwd-32m, and malloc_trim(0) after each backward: the heap's free pages go back to the system",
        {"mmap_threshold": 128 * 1024},
        backward_mmap_threshold=32 * MIB,
        trim_after_backward=True,
    ),
}


def mallopt_spec(variant: Variant) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.mallopt.items())


def variant_env(variant: Variant) -> dict[str, str]:
    """The variables the variant sets: its own, and LD_PRELOAD with its allocator's library as found here
    (SystemExit, one line with the install hint, where it is missing)."""
    if variant.preload is None:
        return dict(variant.env)
    from lowmem_sdpo.allocators import ALLOCATORS  # stdlib only
    from lowmem_sdpo.runtime.cpu_allocator import find_allocator

    library = find_allocator(variant.preload)
    if library is None:
        raise SystemExit(
            f"variant {variant.preload}: its library is not installed ({ALLOCATORS[variant.preload].install})"
        )
    return {**variant.env, "LD_PRELOAD": library}


def child_env(variant: Variant, rusage_dir: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("LOWMEM_SDPO_AB_MALLOPT", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "MALLOC_CONF"):
        env.pop(key, None)
    env.update(variant_env(variant))
    if variant.mallopt:
        env["LOWMEM_SDPO_AB_MALLOPT"] = mallopt_spec(variant)
    if rusage_dir is not None:
        env["LOWMEM_SDPO_AB_RUSAGE_DIR"] = rusage_dir
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HOOK), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    return env


def _usage() -> dict[str, float]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": u.ru_utime + u.ru_stime, "sys_s": u.ru_stime, "minflt": u.ru_minflt}


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


def step_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Mode `step`, in this (fresh) process, under the variant the hook applied."""
    sys.path.insert(0, str(HERE))
    import ctypes

    import torch
    from profile_train_memory import RssPeaks

    from lowmem_sdpo.engine.training.optim import make_optimizer, resolve_optimizer
    from lowmem_sdpo.engine.units import Unit, collate_units
    from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized
    from lowmem_sdpo.models.lora import enable_checkpointing
    from lowmem_sdpo.runtime.cpu_heap import heap_bytes
    from lowmem_sdpo.runtime.hardware import Hardware
    from lowmem_sdpo.runtime.logprobs import batch_logprobs

    libc = ctypes.CDLL("libc.so.6")
    forward_threshold = spec["mallopt"].get("mmap_threshold")
    backward_threshold = spec["backward_mmap_threshold"]

    def set_threshold(value: int | None) -> None:
        if value is not None and backward_threshold is not None:
            assert libc.mallopt(ctypes.c_int(-3), ctypes.c_int(value))

    rss = RssPeaks()
    torch.manual_seed(0)
    with rss.phase("load"):
        model = load_quantized(spec["model"], quant=QuantSettings(compute_dtype="float32"), device="cpu")
    hw = Hardware(torch.device("cpu"), "float32")
    gen = torch.Generator().manual_seed(0)
    length, batch = spec["length"], spec["batch_size"]

    def ids(n: int) -> list[int]:
        return torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()

    answer = length - PROMPT_TOKENS
    units = [Unit(ids(PROMPT_TOKENS), ids(answer), ids(PROMPT_TOKENS), ids(answer)) for _ in range(2 * batch)]
    pad = model.config.pad_token_id or 0
    u0, w0 = _usage(), time.perf_counter()
    with rss.phase("reference"), torch.no_grad():
        model.eval()
        batch_logprobs(model, collate_units(units, pad), hw=hw, impl="torch")
    reference = {**_delta(u0, _usage()), "wall_s": time.perf_counter() - w0}
    policy = add_lora(model, r=spec["lora_r"], alpha=spec["lora_r"], dropout=0.05, seed=0)
    enable_checkpointing(policy.get_base_model())
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(resolve_optimizer("auto", False), params, 1e-5, 0.0)
    train_batch = collate_units(units[:batch], pad)
    steps = []
    for i in range(spec["steps"]):
        u0, w0, load0 = _usage(), time.perf_counter(), os.getloadavg()[0]
        with rss.phase(f"train_{i + 1}"):
            set_threshold(forward_threshold)
            logp, _ = batch_logprobs(policy, train_batch, hw=hw, impl="torch")
            loss = torch.nn.functional.logsigmoid(0.1 * (logp[:batch] - logp[batch:])).neg().mean()
            set_threshold(backward_threshold)
            loss.backward()
            set_threshold(forward_threshold)
            if spec["trim_after_backward"]:
                libc.malloc_trim(ctypes.c_size_t(0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps.append(
            {**_delta(u0, _usage()), "wall_s": time.perf_counter() - w0, "load1": [load0, os.getloadavg()[0]]}
        )
    rss.close()
    return {
        "rss_peak_bytes_by_phase": rss.peaks,
        "vm_hwm_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "glibc_heap_after": heap_bytes(),
        "reference": reference,
        "steps": steps,
    }


def run_step(variant_name: str, args: argparse.Namespace) -> dict[str, Any]:
    variant = VARIANTS[variant_name]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "model": str(Path(args.model).resolve()),
            "length": args.length,
            "batch_size": args.batch_size,
            "lora_r": args.lora_r,
            "steps": args.steps,
            "mallopt": variant.mallopt,
            "backward_mmap_threshold": variant.backward_mmap_threshold,
            "trim_after_backward": variant.trim_after_backward,
            "result": str(Path(tmp) / "result.json"),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        uptime = os.getloadavg()
        subprocess.run(
            [sys.executable, __file__, "--child", str(Path(tmp) / "spec.json")],
            check=True,
            env=child_env(variant),
        )
        row = json.loads(Path(spec["result"]).read_text())
    measured = row["steps"][1:]
    n = len(measured)
    row.update(
        variant=variant_name,
        what=variant.what,
        mallopt=variant.mallopt,
        env=variant_env(variant),
        loadavg_start=list(uptime),
        loadavg_end=list(os.getloadavg()),
        # Means over the steps after the warm-up one.
        step_cpu_s=sum(s["cpu_s"] for s in measured) / n,
        step_sys_s=sum(s["sys_s"] for s in measured) / n,
        step_minflt=sum(s["minflt"] for s in measured) / n,
        step_wall_s=sum(s["wall_s"] for s in measured) / n,
        rss_train_peak_bytes=max(
            v for k, v in row["rss_peak_bytes_by_phase"].items() if k.startswith("train")
        ),
    )
    return row


def run_e2e(variant_name: str, system: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training run of `system` (ours / trl) under the variant; the worker process's own figures."""
    variant = VARIANTS[variant_name]
    with tempfile.TemporaryDirectory() as tmp:
        rusage_dir = Path(tmp) / "rusage"
        rusage_dir.mkdir()
        env = child_env(variant, str(rusage_dir))
        if system == "ours":
            cmd = [
                sys.executable, "-m", "lowmem_sdpo", "run", "--model", args.model, "--steps", args.data,
                "--output-dir", str(Path(tmp) / "run"), "--max-length", "512", "--max-prompt-length", "256",
                "--batch-size", "2", "--grad-accum", "2", "--lora-r", "16", "--lora-alpha", "16",
                "--lora-dropout", "0.05", "--beta", "0.1", "--learning-rate", "5e-6", "--warmup-ratio", "0.1",
                "--seed", "0", "--device", "cpu", "--no-bound-cpu-heap", "--cpu-allocator", "glibc", "--quiet",
                *args.ours_args,
            ]  # fmt: skip
        else:
            cmd = [
                sys.executable, str(HERE / "bench_e2e.py"), "--device", "cpu", "--shapes", "smollm2-135m-q4",
                "--systems", system, "--pairs", str(args.pairs), "--out", str(Path(tmp) / "e2e.json"),
                "--cpu-allocator", "glibc",  # the variant alone sets the malloc (a preloaded one stays)
            ]  # fmt: skip
            cmd[0] = args.trl_python
        load0 = os.getloadavg()
        w0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - w0
        if proc.returncode != 0:
            raise SystemExit(f"{system} under {variant_name} failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(p.read_text()) for p in rusage_dir.glob("*.json")]
        worker = max(records, key=lambda r: r["user_s"] + r["sys_s"])  # the training process
        row: dict[str, Any] = {
            "variant": variant_name,
            "system": system,
            "loadavg_start": list(load0),
            "loadavg_end": list(os.getloadavg()),
            "command_wall_s": wall,
            "worker": worker,
            "worker_cpu_s": worker["user_s"] + worker["sys_s"],
        }
        if system == "ours":
            summary = json.loads((Path(tmp) / "run" / "step-1" / "summary.json").read_text())
            row["ours_step1"] = {
                k: summary.get(k)
                for k in ("wall_seconds", "peak_memory_bytes_by_phase", "first_loss", "tokens_per_second")
            }
        else:
            e2e = json.loads((Path(tmp) / "e2e.json").read_text())
            row["bench_rows"] = [
                {k: r.get(k) for k in ("system", "phase", "wall_s", "cpu_s", "peak_rss_bytes", "tokens")}
                for r in e2e["rows"]
            ]
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("step", "e2e"), default="step")
    parser.add_argument("--model", help="a local Hugging Face model directory, or (e2e) an alias")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["glibc", "mmap-128k"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=3, help="step mode: optimiser steps, the first a warm-up"
    )
    parser.add_argument("--systems", nargs="+", choices=("ours", "trl"), default=["ours", "trl"])
    parser.add_argument("--data", help="e2e: ours' pairs (jsonl); TRL's are bench_e2e's own for --pairs")
    parser.add_argument("--pairs", type=int, default=4, help="e2e: pairs bench_e2e gives TRL")
    parser.add_argument(
        "--trl-python", default=sys.executable, help="e2e: the interpreter with trl installed"
    )
    parser.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[], help="e2e: more `run` options")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ab_cpu_heap.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child.read_text())
        write_json_atomic(Path(spec["result"]), step_child(spec), indent=1)
        return 0
    if not args.model:
        print("--model: required", file=sys.stderr)
        return 2
    from lowmem_sdpo.host import host_record

    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = old.get("rows", [])
    for rep in range(args.repeats):
        for name in args.variants:
            for system in args.systems if args.mode == "e2e" else ["ours-step"]:
                row = run_step(name, args) if args.mode == "step" else run_e2e(name, system, args)
                row.update(mode=args.mode, repeat=rep, omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
                rows.append(row)
                if args.mode == "step":
                    print(
                        f"{name:22s} step cpu {row['step_cpu_s']:.1f} s (sys {row['step_sys_s']:.1f}) wall "
                        f"{row['step_wall_s']:.1f} s minflt {row['step_minflt'] / 1e6:.2f} M, RSS train peak "
                        f"{row['rss_train_peak_bytes'] / MIB:.0f} MiB, load {row['loadavg_start'][0]:.2f}",
                        flush=True,
                    )
                else:
                    print(
                        f"{name:22s} {system:5s} wall {row['command_wall_s']:.1f} s worker cpu "
                        f"{row['worker_cpu_s']:.1f} s minflt {row['worker']['minflt'] / 1e6:.2f} M, HWM "
                        f"{row['worker']['vm_hwm_bytes'] / MIB:.0f} MiB, load {row['loadavg_start'][0]:.2f}",
                        flush=True,
                    )
                write_json_atomic(args.out, {"benchmark": "ab_cpu_heap", "host": host_record(), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
