"""Shared float64 reference, tolerance rule, inputs and dispatch probes for the kernel tests (tests/unit/kernels,
tests/gpu)."""

from __future__ import annotations

import os

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# conftest.py runs Triton under the interpreter on CPU; LOWMEM_SDPO_TEST_CUDA=1 runs it compiled.
DEVICE = "cuda" if os.environ.get("LOWMEM_SDPO_TEST_CUDA") == "1" else "cpu"
FP32_EPS = torch.finfo(torch.float32).eps
# How many fp32 roundings (see assert_within_naive_error) the op may add on top of naive's error.
ATOL_ROUNDINGS = 8.0


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """Plain full-logits log-prob in the inputs' own dtype (logits, written the way transformers'
    Phi / Cohere / Gemma-2 forwards write their heads) then fp32/fp64 log-softmax. Independent of
    the package: no compaction, no chunking, no shared transform code. Ignored rows give 0."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def value_and_grads(fn, hidden, weight, targets, grad_out, weight_grad: bool = True, head=None, bias_grad=True):
    """Run fn(hidden, weight, targets, **head) -> [N], backprop sum(out * grad_out); return float64
    (out, d hidden, d weight or None, d bias or None) computed on fresh leaf copies of the inputs.
    head: None, or the keywords bias / logit_scale / softcap (the bias is copied like the others)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight_grad)
    kwargs = dict(head or {})
    b = kwargs.get("bias")
    if b is not None:
        b = kwargs["bias"] = b.detach().clone().requires_grad_(bias_grad)
    out = fn(h, w, targets, **kwargs)
    (out.double() * grad_out.double()).sum().backward()
    dw = w.grad.double() if weight_grad else None
    db = b.grad.double() if b is not None and bias_grad else None
    return out.double(), h.grad.double(), dw, db


def as_dtype(head, dtype: torch.dtype):
    """The head keywords with the bias (if any) cast to `dtype`."""
    if head is None or head.get("bias") is None:
        return head
    return {**head, "bias": head["bias"].to(dtype)}


def pre_cap_logits(hidden, weight, head=None) -> torch.Tensor:
    """float64 logit_scale * (h W^T + b): the magnitude that sets fp32 rounding of the logits."""
    head = head or {}
    y = hidden.double() @ weight.double().T
    if head.get("bias") is not None:
        y = y + head["bias"].double()
    return y * head.get("logit_scale", 1.0)


def make_inputs(n, d, v, dtype, *, logit_scale=3.0, ignore_frac=0.3, seed=0, device=DEVICE):
    """Random hidden/weight in `dtype` (logits have std about logit_scale), targets with a random
    fraction of ignore_index, and a random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * (logit_scale / d**0.5)).to(dtype)
    weight = torch.randn(v, d, generator=gen).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = -100
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden.to(device), weight.to(device), targets.to(device), grad_out.to(device)


# Head transforms the kernel tests run (keywords of linear_logprobs; make_head adds the bias tensor).
# Scales and caps are chosen so each transform visibly matters at the logits make_inputs produces.
HEAD_CASES = {
    "bias": {"bias_std": 1.0},
    "negative-scale": {"logit_scale": -0.5},
    "softcap": {"softcap": 5.0},  # logits of std ~20 against a cap of 5: mostly saturated
    "all": {"bias_std": 1.0, "logit_scale": 0.7, "softcap": 8.0},
}


def make_head(v: int, dtype: torch.dtype, *, bias_std=None, logit_scale=1.0, softcap=None, seed=0, device=DEVICE):
    """Keywords bias / logit_scale / softcap for linear_logprobs, with a seeded random bias [v]."""
    head: dict = {"logit_scale": logit_scale, "softcap": softcap}
    if bias_std is not None:
        gen = torch.Generator().manual_seed(1000 + seed)
        head["bias"] = (torch.randn(v, generator=gen) * bias_std).to(dtype).to(device)
    return head


def assert_within_naive_error(op, naive, ref, logit_max: float, label: str) -> None:
    """CCE-style rule: vs the float64 truth, the op's error may exceed the same-dtype naive torch
    error only by a small absolute term. That term is ATOL_ROUNDINGS fp32 roundings, because the op
    accumulates in fp32 whatever the input dtype: a logit error of eps32 * |z|max shifts a log-prob
    by about that much (plus eps32 * |logp| from the subtraction), and a gradient, a softmax-weighted
    sum of rows, by about that relative to its own scale."""
    names = ("logp", "grad_hidden", "grad_weight", "grad_bias")
    for name, o, n, r in zip(names, op, naive, ref, strict=True):
        if r is None:
            assert o is None and n is None, f"{label}: {name} expected None"
            continue
        scale = r.abs().max().item()
        if name == "logp":
            atol = ATOL_ROUNDINGS * FP32_EPS * (max(logit_max, 1.0) + scale)
        else:
            atol = ATOL_ROUNDINGS * FP32_EPS * max(logit_max, 1.0) * scale
        err_op = (o - r).abs().max().item()
        err_naive = (n - r).abs().max().item()
        assert err_op <= err_naive + atol, (
            f"{label}: {name} error {err_op:.3e} > naive error {err_naive:.3e} + atol {atol:.3e}"
        )


def check_against_reference(
    fn, hidden, weight, targets, grad_out, label: str, weight_grad: bool = True, head=None, bias_grad=True
) -> None:
    """Compare fn against float64 truth, with the same-dtype naive error as the allowance. head:
    optional bias / logit_scale / softcap keywords (bias in the inputs' dtype)."""
    # The softcap derivative is <= 1, so the pre-cap magnitude bounds how far a logit rounding moves z.
    logit_max = pre_cap_logits(hidden, weight, head).abs().max().item()
    truth = value_and_grads(
        reference_logprobs, hidden.double(), weight.double(), targets, grad_out, weight_grad,
        as_dtype(head, torch.float64), bias_grad,
    )
    naive = value_and_grads(reference_logprobs, hidden, weight, targets, grad_out, weight_grad, head, bias_grad)
    got = value_and_grads(fn, hidden, weight, targets, grad_out, weight_grad, head, bias_grad)
    assert_within_naive_error(got, naive, truth, logit_max, label)


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any aten op produces (forward and backward).
    Integer tensors are left out: the Triton interpreter makes uint8 views of whole storages."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.numel() > self.numel:
                self.numel, self.op = leaf.numel(), f"{func} -> {tuple(leaf.shape)}"
        return out


def largest_tensor(fn, weight_grad: bool, n: int = 300, d: int = 16, v: int = 700) -> LargestTensor:
    # Defaults: N*V = 210000 dwarfs V*D = 11200, N*D = 4800 and a chunk's 16*32 = 512.
    hidden, weight, targets, _ = make_inputs(n, d, v, torch.float32, ignore_frac=0.0)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(weight_grad)
    with LargestTensor() as probe:
        fn(h, w, targets).sum().backward()
    return probe


class SyncOps(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device: a scalar read (.item(), bool())
    and nonzero (its output size is data-dependent)."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def lm_like_inputs(n: int, d: int, v: int, *, sharpness: float = 30.0, seed: int = 0):
    """Rows whose softmax is concentrated on a few tokens, as a trained LM's are: logits of std
    `sharpness`, and each target drawn from that softmax (so usually one of the likely tokens). Each
    block of 16 rows sits near one direction (neighbouring positions of one text), so a 16-row tile can
    be negligible for all its rows at once."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(-(-n // 16), d, generator=gen).repeat_interleave(16, dim=0)[:n]
    hidden = (centers + 0.2 * torch.randn(n, d, generator=gen)) * (sharpness / d**0.5)
    weight = torch.randn(v, d, generator=gen)
    probs = torch.softmax(hidden.double() @ weight.double().T, dim=1)
    targets = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), grad_out.to(DEVICE)
