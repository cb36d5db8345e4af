"""The fused Triton implementation (impl="triton"), under the interpreter on CPU.

Shapes stay small because the interpreter runs every program in Python. bf16 is left to GPU runs
(LOWMEM_SDPO_TEST_CUDA=1): the interpreter's tl.dot returns garbage for bf16 inputs (triton 3.9),
and the CPU suite covers bf16 through the torch impl.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_common import DEVICE, check_against_reference, largest_tensor, make_inputs, value_and_grads

from lowmem_sdpo_kernels import DEFAULT_TRITON_CONFIG, TritonConfig, linear_logprobs

# 16-wide tiles: at V=300 that is 19 vocabulary tiles, grouped 2 per split into 10 splits, the
# last split ending in an all-padding tile (tile 19 starts at 304 >= 300); D=40 is 2.5 K-steps.
SMALL = TritonConfig(block_m=16, block_v=16, block_d=16, num_warps=1, num_stages=1)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

CASES = [  # (N, D, V, logit scale, config)
    pytest.param(37, 24, 123, 3.0, DEFAULT_TRITON_CONFIG, id="odd-default-config"),
    pytest.param(64, 40, 300, 120.0, SMALL, id="large-logits-many-tiles"),
]


def _triton(cfg: TritonConfig, filter_eps: float | str | None = "auto"):
    return lambda h, w, t: linear_logprobs(h, w, t, impl="triton", triton_config=cfg, filter_eps=filter_eps)


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
    for a, b in zip(tri, ref, strict=True):
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
