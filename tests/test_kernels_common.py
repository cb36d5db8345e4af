"""Shared float64 reference and tolerance rule for the kernel tests, plus hand-worked checks.

Other tests/test_kernels_*.py modules import the helpers from here.
"""

from __future__ import annotations

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


def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Plain full-logits log-prob in the inputs' own dtype (logits) then fp32/fp64 log-softmax.
    Independent of the package: no compaction, no chunking. Ignored rows give 0."""
    logits = hidden @ weight.T
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def value_and_grads(fn, hidden, weight, targets, grad_out, weight_grad: bool = True):
    """Run fn(hidden, weight, targets) -> [N], backprop sum(out * grad_out); return float64
    (out, d hidden, d weight or None) computed on fresh leaf copies of the inputs."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight_grad)
    out = fn(h, w, targets)
    (out.double() * grad_out.double()).sum().backward()
    dw = w.grad.double() if weight_grad else None
    return out.double(), h.grad.double(), dw


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


def assert_within_naive_error(op, naive, ref, logit_max: float, label: str) -> None:
    """CCE-style rule: vs the float64 truth, the op's error may exceed the same-dtype naive torch
    error only by a small absolute term. That term is ATOL_ROUNDINGS fp32 roundings, because the op
    accumulates in fp32 whatever the input dtype: a logit error of eps32 * |z|max shifts a log-prob
    by about that much (plus eps32 * |logp| from the subtraction), and a gradient, a softmax-weighted
    sum of rows, by about that relative to its own scale."""
    names = ("logp", "grad_hidden", "grad_weight")
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


def check_against_reference(fn, hidden, weight, targets, grad_out, label: str, weight_grad: bool = True) -> None:
    """Compare fn against float64 truth, with the same-dtype naive error as the allowance."""
    logit_max = (hidden.double() @ weight.double().T).abs().max().item()
    truth = value_and_grads(reference_logprobs, hidden.double(), weight.double(), targets, grad_out, weight_grad)
    naive = value_and_grads(reference_logprobs, hidden, weight, targets, grad_out, weight_grad)
    got = value_and_grads(fn, hidden, weight, targets, grad_out, weight_grad)
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
