"""Shared float64 reference and tolerance rule for the kernel tests, plus hand-worked checks.

Other tests/test_kernels_*.py modules import the helpers from here.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_sdpo_kernels import linear_logprobs

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


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
def test_hand_worked_three_token_vocabulary(impl: str) -> None:
    # h = [1, 0]; W rows [0,0], [1,0], [2,0] -> logits [0, 1, 2]; target 2.
    # Z = 1 + e + e^2 = 11.107337927; logp = 2 - ln Z = 2 - 2.407605964 = -0.407605964.
    # p = [1, e, e^2] / Z = [0.090030573, 0.244728471, 0.665240956].
    # d logp / d h = W_2 - sum_v p_v W_v = [2 - (0.244728471 + 2 * 0.665240956), 0] = [0.424789617, 0].
    # d logp / d W_v = (1[v = 2] - p_v) * h -> first column [-0.090030573, -0.244728471, 0.334759044].
    # The second row of hidden is ignored: logp 0 and zero gradient.
    hidden = torch.tensor([[1.0, 0.0], [3.0, -1.0]], device=DEVICE, requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], device=DEVICE, requires_grad=True)
    targets = torch.tensor([2, -100], device=DEVICE)
    out = linear_logprobs(hidden, weight, targets, impl=impl)
    out.sum().backward()
    torch.testing.assert_close(out.cpu(), torch.tensor([-0.407605964, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad.cpu(), torch.tensor([[0.424789617, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    expected_dw = torch.tensor([[-0.090030573, 0.0], [-0.244728471, 0.0], [0.334759044, 0.0]])
    torch.testing.assert_close(weight.grad.cpu(), expected_dw, atol=1e-6, rtol=0)


def test_reference_helper_matches_hand_value() -> None:
    # Same numbers as above, through the test-side reference in float64.
    hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    out = reference_logprobs(hidden, weight, torch.tensor([2]))
    assert abs(out.item() - (-0.40760596444438)) < 1e-12


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
def test_hand_worked_head_transform(impl: str) -> None:
    # The same three-token head with bias b = [0.5, 0, -0.5], scale 2 and softcap 3:
    # x = [0, 1, 2] + b = [0.5, 1, 1.5]; y = 2x = [1, 2, 3]; z = 3 tanh(y / 3); target 2.
    # logp = z_2 - log sum exp z. d logp / d x_v = (1[v = 2] - p_v) * 2 * (1 - tanh(y_v / 3)^2) =: dx_v,
    # so d/dh = sum_v dx_v W_v (first column sum_v dx_v * v), d/dW_v = dx_v * h, d/db = dx.
    # Written out with math, independently of torch and of reference_logprobs.
    t = [math.tanh(y / 3.0) for y in (1.0, 2.0, 3.0)]
    z = [3.0 * v for v in t]
    log_z = math.log(sum(math.exp(v) for v in z))
    p = [math.exp(v - log_z) for v in z]
    dx = [((v == 2) - p[v]) * 2.0 * (1.0 - t[v] ** 2) for v in range(3)]
    hidden = torch.tensor([[1.0, 0.0]], device=DEVICE, requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], device=DEVICE, requires_grad=True)
    bias = torch.tensor([0.5, 0.0, -0.5], device=DEVICE, requires_grad=True)
    out = linear_logprobs(
        hidden, weight, torch.tensor([2], device=DEVICE), impl=impl, bias=bias, logit_scale=2.0, softcap=3.0
    )
    out.sum().backward()
    assert abs(out.item() - (z[2] - log_z)) < 1e-6
    torch.testing.assert_close(hidden.grad.cpu(), torch.tensor([[dx[1] + 2 * dx[2], 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(weight.grad.cpu(), torch.tensor([[v, 0.0] for v in dx]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias.grad.cpu(), torch.tensor(dx), atol=1e-6, rtol=0)
