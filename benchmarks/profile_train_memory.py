"""Where the memory of a training step goes on CPU: live tensors (from the allocator's events) against the
process's RSS, with the C heap as glibc leaves it and as the engine sets it (runtime/cpu_heap.py).

For each (length, heap, LoRA dropout implementation) a fresh process loads the model as `lowmem-sdpo run` does (NF4 block linears, fp32
compute, bitsandbytes' CPU repacking off), runs a reference pass (no grad, 2 x batch pairs), puts a LoRA on it
with checkpointing, and runs optimiser steps on `--batch-size` pairs whose rows are all `length` tokens (64
prompt, the rest answer: the plan's worst case). Step 1 warms up, step 2 is profiled (torch.profiler,
profile_memory=True; lowmem_sdpo.plan.measure; its RSS is recorded apart, the profiler's records take memory
too), step 3 is timed. Recorded: RSS peaks per phase (`rss_train_peak_bytes`: step 1, before the profiler), glibc's heap
figures, the live-tensor peak of step 2 and the tensors alive at it grouped by (phase, op, module, call
site), the activations among them (live at the peak, minus the LoRA gradients), CPU and wall seconds of step
3 with the load average, and `lowmem-sdpo plan`'s figures for the same settings in its CPU mode.

    .venv/bin/python benchmarks/profile_train_memory.py --model /path/to/smollm2 \\
        --lengths 512 1024 --heaps glibc bounded --lora-dropout-impls lanes torch \\
        --out benchmarks/results/profile_train_memory_smollm2.json

Rows are kept per (length, heap, lora_dropout_impl); rows written before the dropout choice existed ran peft's
nn.Dropout ("torch").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import host_record, write_json_atomic

HEAPS = ("glibc", "bounded")
DROPOUT_IMPLS = ("lanes", "torch")  # lowmem_sdpo.models.lora_dropout.DROPOUT_IMPLS (the parent loads no torch)
PROMPT_TOKENS = 64
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeaks:
    """Samples RSS every 10 ms; `phase(name)` records the largest sample while the phase runs (ru_maxrss
    cannot be reset, so a later phase's own peak is only visible this way)."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self._current = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            self._current = max(self._current, _rss())
            time.sleep(0.01)

    def phase(self, name: str):
        peaks = self

        class _Phase:
            def __enter__(self) -> None:
                peaks._current = _rss()

            def __exit__(self, *exc: Any) -> None:
                peaks.peaks[name] = max(peaks._current, _rss())

        return _Phase()

    def close(self) -> None:
        self._stop = True
        self._thread.join()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _plan_figures(model: str, length: int, batch: int, lora_r: int, dropout_impl: str) -> dict[str, Any]:
    from lowmem_sdpo.plan import PlanSettings, make_plan

    settings = PlanSettings(
        max_length=length,
        batch_size=batch,
        lora_r=lora_r,
        compute_dtype="float32",
        logprob_impl="torch",
        optim="adamw",
        device="cpu",
        pairs_per_step=(batch,),  # one step: no frozen delta
        lora_dropout_impl=dropout_impl,
    )
    plan = make_plan(model, settings, gpu_memory=2**50)
    training = next(p for p in plan.phases if p.key == "training")
    return {
        "training_activation_bytes": training.activation_bytes,
        "training_allocated_bytes": training.allocated,
        "training_peak_moment": training.peak.what,
        "training_parts": {part.name: part.bytes for part in training.peak.parts},
    }


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import torch

    from lowmem_sdpo.runtime.cpu_heap import bound_cpu_heap, heap_bytes

    bounded = bound_cpu_heap() if spec["heap"] == "bounded" else False
    rss = RssPeaks()
    from lowmem_sdpo.engine.training.optim import make_optimizer, resolve_optimizer
    from lowmem_sdpo.engine.units import Unit, collate_units
    from lowmem_sdpo.models import QuantSettings, add_lora, load_quantized
    from lowmem_sdpo.models.lora import enable_checkpointing
    from lowmem_sdpo.plan.measure import trace_live_tensors
    from lowmem_sdpo.runtime.hardware import Hardware
    from lowmem_sdpo.runtime.logprobs import batch_logprobs

    torch.manual_seed(0)
    with rss.phase("load"):
        model = load_quantized(spec["model"], quant=QuantSettings(compute_dtype="float32"), device="cpu")
    hw = Hardware(torch.device("cpu"), "float32")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    length, batch = spec["length"], spec["batch_size"]

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    answer = length - PROMPT_TOKENS
    units = [Unit(ids(PROMPT_TOKENS), ids(answer), ids(PROMPT_TOKENS), ids(answer)) for _ in range(2 * batch)]
    pad = model.config.pad_token_id or 0
    with rss.phase("reference"), torch.no_grad():
        model.eval()
        batch_logprobs(model, collate_units(units[: 2 * batch], pad), hw=hw, impl="torch")
    policy = add_lora(
        model, r=spec["lora_r"], alpha=spec["lora_r"], dropout=0.05, seed=0, dropout_impl=spec["lora_dropout_impl"]
    )
    enable_checkpointing(policy.get_base_model())
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(resolve_optimizer("auto", False), params, 1e-5, 0.0)
    train_batch = collate_units(units[:batch], pad)

    def step() -> None:
        logp, _ = batch_logprobs(policy, train_batch, hw=hw, impl="torch")
        loss = torch.nn.functional.logsigmoid(0.1 * (logp[:batch] - logp[batch:])).neg().mean()
        loss.backward()
        optimizer.step()

    # The profiler's own records grow with the step and stay in the heap after it: phases after it carry them.
    with rss.phase("train"):
        step()  # warm-up: the optimiser state is made here
        optimizer.zero_grad(set_to_none=True)
    with rss.phase("train_profiled"):
        trace = trace_live_tensors(step, attribute=spec.get("attribute", True))
        grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        optimizer.zero_grad(set_to_none=True)
    with rss.phase("train_timed"):
        cpu0, wall0, load0 = _cpu_seconds(), time.perf_counter(), os.getloadavg()
        step()
        cpu1, wall1, load1 = _cpu_seconds(), time.perf_counter(), os.getloadavg()
        optimizer.zero_grad(set_to_none=True)
    heap = heap_bytes()
    rss.close()
    grad_bytes = trace.bytes_where(lambda a: a.ptr in grads)
    return {
        **spec,
        "heap_bounded": bounded,
        "rows": 2 * batch,
        "tokens": 2 * batch * length,
        "rss_peak_bytes_by_phase": rss.peaks,
        # The training peak: the first step, before the profiler ran (its records stay in the process after it).
        "rss_train_peak_bytes": rss.peaks["train"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "glibc_heap_after_training": heap,
        "live_tensor_peak_bytes": trace.peak_bytes,
        "live_lora_grad_bytes_at_peak": grad_bytes,
        "live_activation_bytes_at_peak": trace.peak_bytes - grad_bytes,
        "live_bytes_at_peak_by_phase": trace.by_phase(),
        "allocated_bytes_in_step": trace.allocated_bytes,
        "top_live_at_peak": trace.top(25),
        "timed_step": {
            "cpu_seconds": cpu1 - cpu0,
            "wall_seconds": wall1 - wall0,
            "loadavg": [load0[0], load1[0]],
        },
        "plan": _plan_figures(spec["model"], length, batch, spec["lora_r"], spec["lora_dropout_impl"]),
    }


def _row_key(row: dict[str, Any]) -> tuple[int, str, str]:
    # Rows from before --lora-dropout-impls were measured with peft's nn.Dropout.
    return row["length"], row["heap"], row.get("lora_dropout_impl", "torch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a local Hugging Face model directory (required)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512])
    parser.add_argument("--heaps", nargs="+", choices=HEAPS, default=list(HEAPS))
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch (default 2)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--lora-dropout-impls", nargs="+", choices=DROPOUT_IMPLS, default=["lanes"],
        help="LoRA dropout implementations to profile (run's --lora-dropout-impl; default lanes, run's default)",
    )
    parser.add_argument(
        "--no-attribute",
        action="store_true",
        help="record no Python stacks (faster; the tensors at the peak are then listed without module and site)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_train_memory.json"))
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # child mode: spec JSON in, result out
    args = parser.parse_args(argv)
    if args.one is not None:
        spec = json.loads(args.one.read_text())
        write_json_atomic(Path(spec["result"]), one(spec), indent=1)
        return 0
    if not args.model or not (Path(args.model) / "config.json").is_file():
        print(
            f"--model {args.model}: no config.json there (a local Hugging Face model directory)",
            file=sys.stderr,
        )
        return 2
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = {_row_key(r): r for r in old.get("rows", [])}
    for length, heap, dropout_impl in itertools.product(args.lengths, args.heaps, args.lora_dropout_impls):
        with tempfile.TemporaryDirectory() as tmp:
            spec = {
                "model": str(Path(args.model).resolve()),
                "length": length,
                "heap": heap,
                "batch_size": args.batch_size,
                "lora_r": args.lora_r,
                "lora_dropout_impl": dropout_impl,
                "attribute": not args.no_attribute,
                "result": str(Path(tmp) / "result.json"),
            }
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            subprocess.run([sys.executable, __file__, "--one", str(Path(tmp) / "spec.json")], check=True)
            row = json.loads(Path(spec["result"]).read_text())
        row.pop("result")
        rows[_row_key(row)] = row
        print(
            f"length {length} heap {heap} dropout {dropout_impl}: "
            f"RSS train {row['rss_train_peak_bytes'] / MIB:.0f} MiB, "
            f"live tensors {row['live_tensor_peak_bytes'] / MIB:.0f} MiB, activations "
            f"{row['live_activation_bytes_at_peak'] / MIB:.0f} MiB (plan "
            f"{row['plan']['training_activation_bytes'] / MIB:.0f}), step cpu "
            f"{row['timed_step']['cpu_seconds']:.1f} s",
            flush=True,
        )
        write_json_atomic(
            args.out,
            {
                "benchmark": "profile_train_memory",
                "host": host_record(),
                "model_dir": str(args.model),
                "rows": [rows[k] for k in sorted(rows)],
            },
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
