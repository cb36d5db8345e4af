"""The fused Triton implementation (impl="triton"), under the interpreter on CPU.

Shapes stay small because the interpreter runs every program in Python. bf16 is left to GPU runs
(LOWMEM_SDPO_TEST_CUDA=1): the interpreter's tl.dot returns garbage for bf16 inputs (triton 3.9),
and the CPU suite covers bf16 through the torch impl.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lowmem_sdpo_kernels import DEFAULT_TRITON_CONFIG, TritonConfig, linear_logprobs
from lowmem_sdpo_kernels.triton_tiles import _tanh
from tests.support.kernel_cases import (
    DEVICE,
    HEAD_CASES,
    check_against_reference,
    largest_tensor,
    make_head,
    make_inputs,
    value_and_grads,
)

# 16-wide tiles: at V=300 that is 19 vocabulary tiles, grouped 2 per split into 10 splits, the
# last split ending in an all-padding tile (tile 19 starts at 304 >= 300); D=40 is 2.5 K-steps.
SMALL = TritonConfig(block_m=16, block_v=16, block_d=16, num_warps=1, num_stages=1)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

CASES = [  # (N, D, V, logit scale, config)
    pytest.param(37, 24, 123, 3.0, DEFAULT_TRITON_CONFIG, id="odd-default-config"),
    pytest.param(64, 40, 300, 120.0, SMALL, id="large-logits-many-tiles"),
]


def _triton(cfg: TritonConfig, filter_eps: float | str | None = "auto"):
    return lambda h, w, t, **head: linear_logprobs(
        h, w, t, impl="triton", triton_config=cfg, filter_eps=filter_eps, **head
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "d", "v", "scale", "cfg"), CASES)
def test_triton_matches_float64(dtype, n, d, v, scale, cfg) -> None:
    hidden, weight, targets, grad_out = make_inputs(n, d, v, dtype, logit_scale=scale, seed=v)
    check_against_reference(_triton(cfg), hidden, weight, targets, grad_out, f"triton {dtype} {n}x{d}x{v}")


def test_triton_frozen_weight_skips_weight_gradient() -> None:
    hidden, weight, targets, grad_out = make_inputs(40, 24, 200, torch.float32, seed=5)
    check_against_reference(_triton(SMALL), hidden, weight, targets, grad_out, "frozen", weight_grad=False)
    # Host side: no [N, V] tensor, and with a frozen weight no [V, D] fp32 accumulator either.
    # N*V = 12800 vs N*D = 512 (grad of hidden) and 3 * 13 splits * N = 2496 (forward partials).
    n, d, v = 64, 8, 200
    naive = largest_tensor(lambda h, w, t: linear_logprobs(h, w, t, impl="naive"), False, n, d, v)
    assert naive.numel >= n * v
    fused = largest_tensor(_triton(SMALL), False, n, d, v)
    assert fused.numel <= 3 * 13 * n, fused.op


def test_triton_agrees_with_torch_impl() -> None:
    # Same fp32 arithmetic (fp32 accumulation, exact recompute): the two fused paths agree closely.
    hidden, weight, targets, grad_out = make_inputs(33, 17, 150, torch.float32, logit_scale=20.0, seed=9)
    tri = value_and_grads(_triton(SMALL), hidden, weight, targets, grad_out)
    ref = value_and_grads(lambda h, w, t: linear_logprobs(h, w, t, impl="torch"), hidden, weight, targets, grad_out)
    for a, b in zip(tri[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_filtering_respects_its_mass_budget() -> None:
    # As in the torch test: filter_eps = 0.3 may drop up to 0.3 of a row's softmax mass, bounding
    # the hidden-gradient error of row n by |g_n| * 0.3 * max|W|; targets mostly at the argmax with
    # every fourth row random, so skippable tiles exist and target tiles must be kept.
    eps = 0.3
    hidden, weight, targets, grad_out = make_inputs(48, 16, 400, torch.float32, logit_scale=8.0, seed=11)
    likely = (hidden @ weight.T).argmax(dim=1)
    keep_random = torch.arange(48, device=DEVICE) % 4 == 0
    targets = torch.where((targets == -100) | keep_random, targets, likely)
    exact = value_and_grads(_triton(SMALL, None), hidden, weight, targets, grad_out)
    filtered = value_and_grads(_triton(SMALL, eps), hidden, weight, targets, grad_out)
    torch.testing.assert_close(filtered[0], exact[0], rtol=0, atol=0)  # the forward never filters
    dh_err = (filtered[1] - exact[1]).abs().amax(dim=1)
    bound_h = grad_out.abs() * eps * weight.double().abs().max() + 1e-5
    assert (dh_err <= bound_h).all(), (dh_err - bound_h).max()
    dw_err = (filtered[2] - exact[2]).abs().sum()
    assert dw_err <= (grad_out.abs() * eps * hidden.double().abs().sum(dim=1)).sum() + 1e-4
    assert dh_err.max() > 1e-4, "with this budget some tiles must be skipped, or the test checks nothing"


def test_triton_all_rows_ignored() -> None:
    hidden, weight, _, _ = make_inputs(5, 16, 40, torch.float32)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    out = linear_logprobs(h, w, torch.full((5,), -100, device=DEVICE), impl="triton")
    assert (out == 0).all()
    out.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_triton_head_transforms_match_float64(dtype, case) -> None:
    # 16-wide tiles over V=123 (8 tiles, the last one padded), D=24 (1.5 K-steps), N=37 with ignored
    # rows; weight and bias trainable: logp, d hidden, d weight and d bias against float64.
    hidden, weight, targets, grad_out = make_inputs(37, 24, 123, dtype, logit_scale=20.0, seed=12)
    head = make_head(123, dtype, seed=12, **HEAD_CASES[case])
    check_against_reference(_triton(SMALL), hidden, weight, targets, grad_out, f"triton {case} {dtype}", head=head)


def test_triton_head_agrees_with_torch_impl() -> None:
    # Same fp32 head arithmetic in both fused paths (the Triton tanh is its own, a few ulp off torch's).
    hidden, weight, targets, grad_out = make_inputs(33, 17, 150, torch.float32, logit_scale=20.0, seed=9)
    head = make_head(150, torch.float32, seed=9, **HEAD_CASES["all"])
    tri = value_and_grads(_triton(SMALL), hidden, weight, targets, grad_out, head=head)
    torch_impl = lambda h, w, t, **kw: linear_logprobs(h, w, t, impl="torch", **kw)  # noqa: E731
    ref = value_and_grads(torch_impl, hidden, weight, targets, grad_out, head=head)
    for a, b in zip(tri, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_head_frozen_weight_trainable_bias() -> None:
    hidden, weight, targets, grad_out = make_inputs(30, 16, 100, torch.float32, logit_scale=10.0, seed=13)
    head = make_head(100, torch.float32, seed=13, **HEAD_CASES["all"])
    check_against_reference(_triton(SMALL), hidden, weight, targets, grad_out, "bias only", weight_grad=False, head=head)
    check_against_reference(
        _triton(SMALL), hidden, weight, targets, grad_out, "all frozen", weight_grad=False, head=head, bias_grad=False
    )


def test_triton_filtering_with_head_respects_its_scaled_budget() -> None:
    # As the torch test: the hidden-gradient bound gains |scale| (configs.py); the bias gradient moves
    # by at most filter_eps * |scale| * sum |g| in total.
    eps = 0.3
    hidden, weight, targets, grad_out = make_inputs(32, 16, 320, torch.float32, logit_scale=8.0, seed=11)
    head = make_head(320, torch.float32, seed=11, bias_std=1.0, logit_scale=2.5, softcap=30.0)
    likely = (hidden @ weight.T + head["bias"]).argmax(dim=1)
    keep_random = torch.arange(32, device=DEVICE) % 4 == 0
    targets = torch.where((targets == -100) | keep_random, targets, likely)
    exact = value_and_grads(_triton(SMALL, None), hidden, weight, targets, grad_out, head=head)
    filtered = value_and_grads(_triton(SMALL, eps), hidden, weight, targets, grad_out, head=head)
    torch.testing.assert_close(filtered[0], exact[0], rtol=0, atol=0)  # the forward never filters
    scale = abs(head["logit_scale"])
    dh_err = (filtered[1] - exact[1]).abs().amax(dim=1)
    bound_h = grad_out.abs() * eps * scale * weight.double().abs().max() + 1e-5
    assert (dh_err <= bound_h).all(), (dh_err - bound_h).max()
    assert (filtered[3] - exact[3]).abs().sum() <= eps * scale * grad_out.abs().sum() + 1e-5
    assert dh_err.max() > 1e-4, "with this budget some tiles must be skipped, or the test checks nothing"


@triton.jit
def _tanh_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _tanh(tl.load(X + offs)))


def test_triton_tanh_is_accurate_to_a_few_ulp() -> None:
    # The kernels' own tanh (tl has none) against float64 torch.tanh, across both of its branches
    # (series below 1/8, exp form above), both signs, and far into saturation.
    mag = torch.logspace(-6, 2, 500, dtype=torch.float64)
    x64 = torch.cat([mag, -mag, torch.tensor([0.0, 0.125, -0.125], dtype=torch.float64)])
    x64 = torch.cat([x64, torch.zeros(1024 - x64.numel(), dtype=torch.float64)])
    x = x64.float().to(DEVICE)
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, N=1024)
    truth = torch.tanh(x.double().cpu())
    ulp = torch.finfo(torch.float32).eps * truth.abs().clamp(min=torch.finfo(torch.float32).tiny)
    err_ulps = ((y.double().cpu() - truth).abs() / ulp).max().item()
    assert err_ulps <= 4.0, err_ulps
