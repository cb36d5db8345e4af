"""bench_kernels.py's cases and peers: the shapes it times (N rows, D hidden, V vocab, dtype, lm-head gradient,
share of ignored rows, logit kind) and every implementation it times on them, by name."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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


def load_kernels():
    # Imported late: TRITON_INTERPRET must be set (on CPU) before triton is first imported.
    return importlib.import_module("lowmem_sdpo_kernels")


def _ours(impl: str, **options: Any) -> Callable[[Case, str, argparse.Namespace], StepFn]:
    def factory(case: Case, device: str, args: argparse.Namespace) -> StepFn:
        kernels = load_kernels()
        cfg = "autotune" if (args.autotune and impl == "triton") else None
        return lambda h, w, t: kernels.linear_logprobs(h, w, t, impl=impl, triton_config=cfg, **options)

    return factory


def _ours_with_rows(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    # The engine's way: the valid-row index is found on the host before the step (no device -> host sync).
    kernels = load_kernels()
    cached: dict[int, torch.Tensor] = {}

    def fn(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in cached:  # once per input set, outside the timed work on every later call
            cached[id(t)] = kernels.valid_rows(t.cpu(), w.shape[0]).to(t.device)
        return kernels.linear_logprobs(h, w, t, impl="triton", rows=cached[id(t)])

    return fn


def _ours_group1(case: Case, device: str, args: argparse.Namespace) -> StepFn:
    # The launch order before issue 13: the row block varies fastest over the whole grid (group_m = 1).
    kernels = load_kernels()
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
