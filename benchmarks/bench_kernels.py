#!/usr/bin/env python
"""Forward+backward benchmark of the fused log-prob op against its peers.

    python benchmarks/bench_kernels.py                 # full grid on CUDA (bf16, N x V sweep)
    python benchmarks/bench_kernels.py --smoke         # tiny fp32 case; automatic without CUDA
    python benchmarks/bench_kernels.py --impls ours-triton naive-torch --n 4096 --v 32000

Per row: median forward+backward milliseconds over >= 20 timed runs after warm-up (CUDA events on
GPU, time.perf_counter on CPU), achieved TFLOP/s on the rows that have a target
(2NDV forward + 4NDV backward, +2NDV when the weight is trainable), and peak extra memory
(torch.cuda.max_memory_allocated minus the baseline with inputs allocated; null on CPU, where it is
not measured). Peers that cannot run are kept as rows with status "skipped: <reason>", failures as
"error: <reason>". The JSON is rewritten atomically after every row, so a cut-off run keeps what
it finished. See benchmarks/README.md for the schema.

Issue 13 adds: logits of two kinds ("normal": N(0,1)-scaled, "lm": sharp, targets drawn from their
softmax, where gradient filters fire); per row the ratios to apple-cce and liger-flce on the same case
(time and peak memory) and to the FLOP floor (the useful FLOPs at the matmul rate measured on this
device at the same dtype); and --variants, our Triton kernel with one design choice switched (the old
launch order, no filter, the per-element filter, input-dtype atomics, the valid-row index precomputed).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# benchmarks/common.py and kernel_peers.py sit beside this script: first on sys.path when it runs as a script; a
# test that loads this file by path needs the directory put there.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import RESULTS as RESULTS_DIR  # noqa: E402
from common import device_label, git_commit, host_record, write_json_atomic  # noqa: E402
from kernel_peers import (  # noqa: E402
    BASELINES,
    PEERS,
    RUNNABLE,
    SMOKE_CASES,
    VARIANTS,
    Case,
    Skip,
    StepFn,
    full_cases,
    load_kernels,
)  # fmt: skip

__all__ = ["BASELINES", "PEERS", "RUNNABLE", "SMOKE_CASES", "VARIANTS", "Case", "Skip", "StepFn", "full_cases"]


# ---- measurement ----


def _normal_logits(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """hidden ~ N(0, 1), weight ~ N(0, 1/D): logits of std ~1, a flat softmax (as drawn)."""


ZIPF_EXPONENT = 1.5
LM_SPREAD = 2.0


def _lm_logits(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """In place: logits z_nv = (std-2 noise) - 1.5 ln(v + 1). The shared term is a Zipf-like token
    frequency (token ids in frequency order, as BPE vocabularies roughly are), carried by the first
    coordinate: hidden[:, 0] = 1, weight[v, 0] = -1.5 ln(v + 1). So most of a row's softmax sits on its
    few likely tokens and rare tokens are negligible in every row, as in a trained LM's output, which is
    where gradient filters can skip whole tiles."""
    hidden.mul_(LM_SPREAD)
    hidden[:, 0] = 1.0
    ranks = torch.arange(weight.shape[0], device=weight.device, dtype=torch.float32)
    weight[:, 0] = -ZIPF_EXPONENT * torch.log1p(ranks)


# Logit kinds: name -> in-place shaping of fp32 hidden [N, D] ~ N(0, 1) and weight [V, D] ~ N(0, 1/D).
# "lm" also draws each target from its row's own softmax (a trained LM's next token is mostly among its
# likely ones); "normal" draws targets uniformly.
LOGITS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {"normal": _normal_logits, "lm": _lm_logits}


def _sample_targets(hidden: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    for r0 in range(0, hidden.shape[0], 1024):  # 1024 rows of fp32 probabilities at a time
        probs = torch.softmax((hidden[r0:r0 + 1024].float() @ weight.float().T), dim=1)
        out[r0:r0 + 1024] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return out


def make_inputs(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(case.n, case.d, generator=gen, device=device)
    weight = torch.randn(case.v, case.d, generator=gen, device=device) / case.d**0.5
    LOGITS[case.logits](hidden, weight)
    hidden, weight = hidden.to(case.dtype), weight.to(case.dtype)
    if case.logits == "lm":
        targets = _sample_targets(hidden, weight, gen)
    else:
        targets = torch.randint(0, case.v, (case.n,), generator=gen, device=device)
    n_ignored = round(case.n * case.ignored_frac)
    targets[torch.randperm(case.n, generator=gen, device=device)[:n_ignored]] = -100
    return hidden.requires_grad_(True), weight.requires_grad_(case.grad_weight), targets


def _step(fn: StepFn, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
    fn(h, w, t).float().sum().backward()


def time_ms(fn: StepFn, h, w, t, device: str, runs: int, warmup: int, backward: bool = True) -> list[float]:
    step = _step if backward else fn
    for _ in range(warmup):
        h.grad = w.grad = None
        step(fn, h, w, t) if backward else step(h, w, t)
    times = []
    for _ in range(runs):
        h.grad = w.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step(fn, h, w, t) if backward else step(h, w, t)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            step(fn, h, w, t) if backward else step(h, w, t)
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def peak_extra_bytes(fn: StepFn, h, w, t, device: str) -> int | None:
    """CUDA: peak allocated during one forward+backward minus what was allocated before (inputs).
    Gradients and outputs count as extra. CPU: None (not measured)."""
    if device != "cuda":
        return None
    h.grad = w.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, h, w, t)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def matmul_tflops(dtype: torch.dtype, device: str, d: int = 4096) -> float:
    """This device's dense matmul rate at `dtype`: [8192, d] x [d, 8192] (CPU: 512-sized), median of 10."""
    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, d if device == "cuda" else 512, device=device).to(dtype)
    b = torch.randn(a.shape[1], size, device=device).to(dtype)
    times = time_ms(lambda x, y, _: x @ y, a, b, None, device, runs=10, warmup=2, backward=False)
    return 2.0 * size * a.shape[1] * size / (statistics.median(times) * 1e-3) / 1e12


def useful_flops(case: Case, n_valid: int) -> float:
    # Forward 2NDV; backward recomputes logits (2NDV) and forms dH (2NDV); dW adds 2NDV.
    per = 6 + (2 if case.grad_weight else 0)
    return float(per) * n_valid * case.d * case.v


def run_one(name: str, case: Case, device: str, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {
        "impl": name,
        "N": case.n,
        "D": case.d,
        "V": case.v,
        "dtype": str(case.dtype).removeprefix("torch."),
        "grad_weight": case.grad_weight,
        "ignored_frac": case.ignored_frac,
        "logits": case.logits,
        "ms_median": None,
        "peak_extra_bytes": None,
        "tflops": None,
        "floor_ms": None,
        "vs_floor": None,
        **{key: None for key in BASELINES},
        **{f"mem_{key}": None for key in BASELINES},
        "status": "ok",
    }
    h = w = t = None
    try:
        fn = RUNNABLE[name](case, device, args)
        h, w, t = make_inputs(case, device)
        times = time_ms(fn, h, w, t, device, args.runs, args.warmup)
        row["ms_median"] = statistics.median(times)
        row["peak_extra_bytes"] = peak_extra_bytes(fn, h, w, t, device)
        n_valid = int((t != -100).sum())
        row["tflops"] = useful_flops(case, n_valid) / (row["ms_median"] * 1e-3) / 1e12
        rate = args.matmul_tflops.get(case.dtype)
        if rate:
            row["floor_ms"] = useful_flops(case, n_valid) / (rate * 1e12) * 1e3
            row["vs_floor"] = row["ms_median"] / row["floor_ms"]
    except Skip as exc:
        row["status"] = str(exc)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "error: out of memory"
    except Exception as exc:  # a peer's failure is a result row, not the end of the run
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        del h, w, t
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def filter_skip_fractions(case: Case, device: str) -> dict[str, Any]:
    """Which share of our Triton backward's tiles each gradient filter would skip on this case's inputs,
    at the tile the dtype gets on this device and the filters' "auto" thresholds (configs.py): the mass
    bound's dH test (every row's tile mass < eps / (2 n_tiles), or its forward split's mass <= eps /
    (2 n_splits)), its dW test (every column's mass summed over the tile's rows < eps / n_row_blocks),
    and the per-element rule (every p < 2**-12). A tile holding a target is never skipped. Computed here
    from fp32 softmax rows, 1024 at a time (no [N, V] tensor)."""
    kernels = load_kernels()
    configs = kernels.configs
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin if device == "cuda" else None
    cfg = configs.select_triton_config(case.dtype, limit)
    h, w, t = make_inputs(case, device)
    h, w = h.detach(), w.detach()
    valid = t != -100
    h, t = h[valid], t[valid]  # the kernels' logical rows: only rows with a target
    bm, bv = cfg.block_m, cfg.block_v
    n_blocks, n_tiles = -(-h.shape[0] // bm), -(-case.v // bv)
    n_splits, per_split = importlib.import_module("lowmem_sdpo_kernels.triton_forward")._vocab_splits(case.v, bv)
    eps_bound = configs.resolve_filter_eps("auto", case.dtype, "bound")
    eps_element = configs.resolve_filter_eps("auto", case.dtype, "element")
    counts = {"bound_dh": 0, "bound_dw": 0, "element": 0}
    chunk = 1024 - 1024 % bm or bm
    for r0 in range(0, h.shape[0], chunk):
        hc, tc = h[r0:r0 + chunk], t[r0:r0 + chunk]
        rows = -(-hc.shape[0] // bm) * bm
        p = torch.zeros(rows, n_tiles * bv, device=device)
        p[: hc.shape[0], : case.v] = torch.softmax(hc.float() @ w.float().T, dim=1)
        tiles = p.view(rows // bm, bm, n_tiles, bv)
        has_target = torch.zeros(rows // bm, n_tiles, dtype=torch.bool, device=device)
        has_target[torch.arange(hc.shape[0], device=device) // bm, tc // bv] = True
        free = ~has_target
        if eps_bound is not None:
            tile_mass = tiles.sum(dim=3)  # [blocks, bm, n_tiles]
            padded = torch.zeros(*tile_mass.shape[:2], n_splits * per_split, device=device)
            padded[..., :n_tiles] = tile_mass
            split_mass = padded.view(*tile_mass.shape[:2], n_splits, per_split).sum(dim=3)
            split_of_tile = split_mass.repeat_interleave(per_split, dim=2)[..., :n_tiles]
            needs = (tile_mass >= eps_bound / (2 * n_tiles)) & (split_of_tile > eps_bound / (2 * n_splits))
            counts["bound_dh"] += int((free & ~needs.any(dim=1)).sum())
            counts["bound_dw"] += int((free & (tiles.sum(dim=1).amax(dim=2) < eps_bound / n_blocks)).sum())
        if eps_element is not None:
            counts["element"] += int((free & (tiles.amax(dim=(1, 3)) < eps_element)).sum())
    total = max(n_blocks * n_tiles, 1)
    return {
        "N": case.n, "V": case.v, "dtype": str(case.dtype).removeprefix("torch."), "logits": case.logits,
        "ignored_frac": case.ignored_frac, "tile": [bm, bv], "eps_bound": eps_bound, "eps_element": eps_element,
        **{key: value / total for key, value in counts.items()},
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each ok row's time over the same case's CCE / Liger time, and its peak memory over CCE's."""
    def key(r: dict[str, Any]) -> tuple:
        return (r["N"], r["D"], r["V"], r["dtype"], r["grad_weight"], r["ignored_frac"], r["logits"])

    ok = {(key(r), r["impl"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for field, peer in BASELINES.items():
            base = ok.get((key(r), peer))
            r[field] = None if base is None else r["ms_median"] / base["ms_median"]
            known = base is not None and base["peak_extra_bytes"] and r["peak_extra_bytes"] is not None
            r[f"mem_{field}"] = r["peak_extra_bytes"] / base["peak_extra_bytes"] if known else None


# ---- output ----


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("impl", "N", "D", "V", "logits", "dW", "ignored", "ms", "TFLOP/s", "peak MiB", "/CCE", "/Liger",
                "/Liger-sum", "/floor"):
        table.add_column(col, justify="left" if col in ("impl", "dtype") else "right", no_wrap=True)
    table.add_column("status", max_width=70, overflow="ellipsis", no_wrap=True)

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in rows:
        peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        table.add_row(
            r["impl"], str(r["N"]), str(r["D"]), str(r["V"]), r["logits"], "yes" if r["grad_weight"] else "no",
            f"{r['ignored_frac']:.1f}", num(r["ms_median"], ".3f"), num(r["tflops"], ".2f"), peak,
            num(r["vs_cce"], ".2f"), num(r["vs_liger"], ".2f"), num(r["vs_liger_sum"], ".2f"),
            num(r["vs_floor"], ".2f"), r["status"],
        )
    Console(width=None if sys.stdout.isatty() else 170).print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 case (automatic without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--impls", nargs="+", choices=sorted(PEERS), default=list(PEERS), help="peers to run")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=[],
                        help="our Triton kernel with one design choice switched (added to --impls)")
    parser.add_argument("--logits", nargs="+", choices=sorted(LOGITS), default=sorted(LOGITS),
                        help="logit kinds (full mode): normal N(0,1), lm sharp with targets drawn from the softmax")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="row counts (full mode)")
    parser.add_argument("--v", type=int, nargs="+", default=[32000, 128256], help="vocab sizes (full mode)")
    parser.add_argument("--d", type=int, default=4096, help="hidden size (full mode)")
    parser.add_argument("--weight", nargs="+", choices=["frozen", "trained"], default=["frozen", "trained"],
                        help="lm-head weight without / with its gradient (full mode)")
    parser.add_argument("--ignored", type=float, nargs="+", default=[0.0, 0.5],
                        help="shares of rows without a target (full mode)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per row (>= 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--autotune", action="store_true", help="ours-triton: triton_config='autotune'")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs must be >= 20 (the median is taken over at least 20 runs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke or device == "cpu"
    if device == "cpu":
        # Before lowmem_sdpo_kernels (and triton) is imported: run our kernels in the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.warmup is None:
        args.warmup = 3 if device == "cuda" else 1
    import triton

    weights = tuple(w == "trained" for w in args.weight)
    cases = SMOKE_CASES if smoke else full_cases(args.n, args.v, args.d, args.logits, weights, tuple(args.ignored))
    args.matmul_tflops = {dtype: matmul_tflops(dtype, device) for dtype in {c.dtype for c in cases}}
    out = args.out or RESULTS_DIR / ("bench_kernels_smoke.json" if smoke else "bench_kernels.json")
    payload: dict[str, Any] = {
        "device": device_label(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": host_record(),
        "commit": git_commit(),
        "mode": "smoke" if smoke else "full",
        "timer": "cuda-events" if device == "cuda" else "perf_counter",
        "memory": "torch.cuda.max_memory_allocated - baseline" if device == "cuda" else "not measured (null)",
        "runs": args.runs,
        "warmup": args.warmup,
        "matmul_tflops": {str(k).removeprefix("torch."): v for k, v in args.matmul_tflops.items()},
        "rows": [],
        "filter_skip": [],
    }
    seen_inputs = set()
    for case in cases:
        inputs = (case.n, case.v, case.dtype, case.logits, case.ignored_frac)
        if inputs not in seen_inputs:  # frozen and trained weight share their inputs
            seen_inputs.add(inputs)
            payload["filter_skip"].append(filter_skip_fractions(case, device))
        for name in [*args.impls, *args.variants]:
            payload["rows"].append(run_one(name, case, device, args))
            add_ratios(payload["rows"])
            write_json_atomic(out, payload)
    write_json_atomic(out, payload)
    print_table(payload["rows"], f"fused log-prob fwd+bwd on {payload['device']} ({payload['mode']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
