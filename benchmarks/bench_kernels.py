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
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    v: int
    dtype: torch.dtype
    grad_weight: bool
    ignored_frac: float
    logits: str = "normal"  # a key of LOGITS


def full_cases(
    ns: list[int], vs: list[int], d: int, logits: list[str],
    grad_weights: tuple[bool, ...] = (False, True), ignored: tuple[float, ...] = (0.0, 0.5),
) -> list[Case]:
    return [
        Case(n, d, v, torch.bfloat16, grad_weight, frac, kind)
        for n in ns
        for v in vs
        for kind in logits
        for grad_weight in grad_weights
        for frac in ignored
    ]


SMOKE_CASES = [
    Case(64, 32, 500, torch.float32, grad_weight=False, ignored_frac=0.5),
    Case(64, 32, 500, torch.float32, grad_weight=True, ignored_frac=0.0, logits="lm"),
]


class Skip(Exception):
    """A peer that cannot run here; its message becomes the row's status."""


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- peers: name -> factory(case, device, args) -> fn(hidden, weight, targets) -> tensor to sum ----


def _kernels():
    # Imported late: TRITON_INTERPRET must be set (on CPU) before triton is first imported.
    return importlib.import_module("lowmem_sdpo_kernels")


def _ours(impl: str, **options: Any) -> Callable[[Case, str, argparse.Namespace], StepFn]:
    def factory(case: Case, device: str, args: argparse.Namespace) -> StepFn:
        kernels = _kernels()
        cfg = "autotune" if (args.autotune and impl == "triton") else None
        return lambda h, w, t: kernels.linear_logprobs(h, w, t, impl=impl, triton_config=cfg, **options)

    return factory


def _ours_with_rows(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    # The engine's way: the valid-row index is found on the host before the step (no device -> host sync).
    kernels = _kernels()
    cached: dict[int, torch.Tensor] = {}

    def fn(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in cached:  # once per input set, outside the timed work on every later call
            cached[id(t)] = kernels.valid_rows(t.cpu(), w.shape[0]).to(t.device)
        return kernels.linear_logprobs(h, w, t, impl="triton", rows=cached[id(t)])

    return fn


def _ours_group1(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    # The launch order before issue 13: the row block varies fastest over the whole grid (group_m = 1).
    kernels = _kernels()
    base = kernels.configs.select_triton_config(case.dtype, None if device != "cuda" else
                                                torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
    cfg = kernels.TritonConfig(base.block_m, base.block_v, base.block_d, base.num_warps, base.num_stages, group_m=1)
    return lambda h, w, t: kernels.linear_logprobs(h, w, t, impl="triton", triton_config=cfg)


def _naive_fn(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # What a plain model forward does: full [N, V] logits, fp32 log-softmax, gather, mask.
    logp = torch.log_softmax((h @ w.T).float(), dim=-1)
    picked = logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(t != -100, picked, torch.zeros_like(picked))


def _naive(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    return _naive_fn


def _naive_compiled(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    if device != "cuda":
        raise Skip("skipped: torch.compile peer runs on CUDA only (on CPU its compile time would dominate)")
    return torch.compile(_naive_fn, dynamic=False)


def _liger_flce_with(reduction: str) -> Callable[[Case, str, argparse.Namespace], StepFn]:
    """Liger's fused linear cross-entropy. reduction "none" gives the per-row loss (our op's output), but
    liger-kernel 0.8.5 then keeps every gradient for the backward and recomputes the logits there: its slow
    path. "sum" computes the gradients in the forward pass (its fast path); under .sum().backward() both give
    the same gradients, so both are timed and the ratios name which."""

    def factory(case: Case, device: str, args: argparse.Namespace) -> StepFn:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as exc:
            raise Skip(f"skipped: liger_kernel not importable ({exc})") from exc
        if device != "cuda":
            raise Skip("skipped: Liger's Triton kernels would run in the interpreter on CPU (too slow to time)")
        loss = LigerFusedLinearCrossEntropyLoss(reduction=reduction, ignore_index=-100)
        return lambda h, w, t: -loss(w, h, t)  # per-token loss (or its sum) = -log p

    return factory


def _dpo_layout(n: int) -> tuple[int, int]:
    # [2B, T, D] with chosen rows first, rejected after: T = 512 (or N/4 for tiny N), 2B = N / T.
    length = 512 if n >= 1024 else max(1, n // 4)
    return n // length, length


def _liger_dpo(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as exc:
        raise Skip(f"skipped: liger_kernel not importable ({exc})") from exc
    seqs, length = _dpo_layout(case.n)
    if seqs % 2 or seqs * length != case.n:
        raise Skip(f"skipped: N={case.n} does not split into chosen/rejected sequences of {length}")
    # A whole DPO loss (policy log-probs of chosen and rejected, no reference model), not the bare
    # log-prob op; compiled chunks on CUDA as Liger ships it, eager on CPU.
    loss = LigerFusedLinearDPOLoss(ignore_index=-100, beta=0.1, use_ref_model=False, compiled=device == "cuda")

    def fn(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = loss(w, h.view(seqs, length, -1), t.view(seqs, length))
        return out[0] if isinstance(out, tuple) else out

    return fn


def _apple_cce(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Skip(f"skipped: cut_cross_entropy not importable ({exc})") from exc
    if device != "cuda":
        raise Skip("skipped: cut_cross_entropy needs CUDA")
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")


PEERS: dict[str, Callable[[Case, str, argparse.Namespace], StepFn]] = {
    "ours-triton": _ours("triton"),
    "ours-torch": _ours("torch"),
    "naive-torch": _naive,
    "naive-torch-compile": _naive_compiled,
    "liger-flce": _liger_flce_with("none"),
    "liger-flce-sum": _liger_flce_with("sum"),
    "liger-dpo": _liger_dpo,
    "apple-cce": _apple_cce,
}


# Our Triton kernel with one design choice switched, reachable with --variants (not run by default).
VARIANTS: dict[str, Callable[[Case, str, argparse.Namespace], StepFn]] = {
    "ours-triton[group1]": _ours_group1,
    "ours-triton[no-filter]": _ours("triton", filter_eps=None),
    "ours-triton[element-filter]": _ours("triton", filter="element"),
    "ours-triton[input-atomics]": _ours("triton", grad_accum="input"),
    "ours-triton[rows]": _ours_with_rows,
    "ours-torch[deterministic]": _ours("torch", deterministic=True),
}
RUNNABLE = {**PEERS, **VARIANTS}

# Ratios are taken against these peers on the same case.
BASELINES = {"vs_cce": "apple-cce", "vs_liger": "liger-flce", "vs_liger_sum": "liger-flce-sum"}


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
    kernels = _kernels()
    configs = kernels.configs
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin if device == "cuda" else None
    cfg = configs.select_triton_config(case.dtype, limit)
    h, w, t = make_inputs(case, device)
    h, w = h.detach(), w.detach()
    valid = t != -100
    h, t = h[valid], t[valid]  # the kernels' logical rows: only rows with a target
    bm, bv = cfg.block_m, cfg.block_v
    n_blocks, n_tiles = -(-h.shape[0] // bm), -(-case.v // bv)
    n_splits, per_split = importlib.import_module("lowmem_sdpo_kernels.triton_logprobs")._vocab_splits(case.v, bv)
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


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def git_commit() -> str | None:
    """LOWMEM_SDPO_COMMIT when set (gpu_pass.sh passes the CPU side's: the device copy may have no .git),
    else git's HEAD."""
    if os.environ.get("LOWMEM_SDPO_COMMIT"):
        return os.environ["LOWMEM_SDPO_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


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
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": _host_record(),
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


def _host_record() -> dict[str, Any]:
    # Imported here: the script sets up its environment before lowmem_sdpo loads.
    from lowmem_sdpo.host import host_record

    return host_record()


if __name__ == "__main__":
    sys.exit(main())
