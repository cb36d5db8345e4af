"""Gradient filters (issue 13): the opt-in per-element rule, the mass bound applied to dH and dW separately,
weight-only gradients and the deterministic switch. Triton under the interpreter, torch on CPU."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo_kernels import TorchChunks, TritonConfig, linear_logprobs
from lowmem_sdpo_kernels.configs import OpOptions, resolve_filter_eps
from lowmem_sdpo_kernels.torch_chunked import torch_linear_logprobs
from tests.support.kernel_cases import (
    DEVICE,
    check_against_reference,
    lm_like_inputs,
    make_inputs,
    value_and_grads,
)

SMALL = TritonConfig(block_m=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
CHUNKS = TorchChunks(rows=16, vocab=32)  # the torch impl's filter works per chunk: make chunks tile-sized
ELEMENT_EPS = 2.0**-12


IMPLS = {
    "triton": lambda **kw: lambda h, w, t: linear_logprobs(h, w, t, impl="triton", triton_config=SMALL, **kw),
    "torch": lambda **kw: lambda h, w, t: _torch_small_chunks(h, w, t, **kw),
}


def _torch_small_chunks(h, w, t, filter="bound", filter_eps=None):
    # The public op's chunks are 4096 wide; the filter needs several per row to have anything to skip.
    options = OpOptions(resolve_filter_eps(filter_eps, h.dtype, filter), None, filter_mode=filter)
    valid = t != -100
    out = torch_linear_logprobs(h[valid], w, None, t[valid], options, CHUNKS)
    return torch.zeros(t.shape[0], dtype=out.dtype, device=out.device).index_put((valid,), out)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_element_filter_error_is_what_it_dropped(impl: str) -> None:
    # The per-element rule only skips entries with p < eps (whole tiles of them), so against the exact
    # gradient the error of hidden row n is at most |g_n| * sum over {v: p_nv < eps} of p_nv * |W_v|_inf,
    # and of weight row v at most sum over {n: p_nv < eps} of |g_n| p_nv |h_n|_inf: computed here in float64.
    hidden, weight, targets, grad_out = lm_like_inputs(32, 16, 256, seed=1)
    exact = value_and_grads(IMPLS[impl](filter_eps=None), hidden, weight, targets, grad_out)
    filtered = value_and_grads(IMPLS[impl](filter="element", filter_eps=ELEMENT_EPS), hidden, weight, targets, grad_out)
    assert torch.equal(filtered[0], exact[0])  # the forward never filters
    p = torch.softmax(hidden.double() @ weight.double().T, dim=1)
    dropped = p * (p < ELEMENT_EPS * (1 + 1e-5))  # the kernel compares fp32 p: a little slack at the edge
    g = grad_out.abs()
    bound_h = g * (dropped @ weight.double().abs().amax(dim=1))
    bound_w = (dropped * g[:, None]).T @ hidden.double().abs().amax(dim=1)
    err_h = (filtered[1] - exact[1]).abs().amax(dim=1)
    err_w = (filtered[2] - exact[2]).abs().amax(dim=1)
    assert (err_h <= bound_h + 1e-6).all(), (err_h - bound_h).max()
    assert (err_w <= bound_w + 1e-6).all(), (err_w - bound_w).max()
    assert err_h.max() > 0, "on LM-like rows the rule must skip something, or this checks nothing"


def test_mass_bound_filters_dh_and_dw_separately() -> None:
    # Bound mode tests a tile's row masses for the dH product and its column masses for the dW product, each
    # against its own budget: hidden row n errs by at most |g_n| eps max|W| (eps over its vocabulary tiles),
    # weight row v by at most eps max|g| max|h| (eps over its row blocks). dH does not depend on whether the
    # weight is trained: same skips, same bits.
    eps = 0.3
    hidden, weight, targets, grad_out = lm_like_inputs(32, 16, 256, sharpness=15.0, seed=3)
    # Here (float64, 2 x 8 tiles of 16 x 32) the two tests disagree on two tiles: one product is skipped,
    # the other kept.
    p = torch.softmax(hidden.double() @ weight.double().T, dim=1).view(2, 16, 8, 32)
    onehot = torch.nn.functional.one_hot(targets, 256).view(2, 16, 8, 32).amax(dim=(1, 3)) > 0
    skip_h = (p.sum(dim=3).amax(dim=1) < eps / 8) & ~onehot
    skip_w = (p.sum(dim=1).amax(dim=2) < eps / 2) & ~onehot
    assert (skip_h != skip_w).any()
    exact = value_and_grads(IMPLS["triton"](filter_eps=None), hidden, weight, targets, grad_out)
    filtered = value_and_grads(IMPLS["triton"](filter_eps=eps), hidden, weight, targets, grad_out)
    frozen = value_and_grads(IMPLS["triton"](filter_eps=eps), hidden, weight, targets, grad_out, weight_grad=False)
    assert torch.equal(frozen[1], filtered[1])
    err_h = (filtered[1] - exact[1]).abs().amax(dim=1)
    assert (err_h <= grad_out.abs() * eps * weight.double().abs().max() + 1e-5).all()
    err_w = (filtered[2] - exact[2]).abs().amax(dim=1)
    assert (err_w <= eps * grad_out.abs().max() * hidden.double().abs().max() + 1e-5).all()
    assert err_h.max() > 1e-4 and err_w.max() > 1e-4, "both products must be skipped somewhere"


def test_mass_bound_skips_whole_splits_a_row_does_not_need() -> None:
    # The dH test also skips a tile for a row whose whole forward split holds at most eps / (2 n_splits) of
    # its mass (half the budget); tiles under eps / (2 n_tiles) take the other half. Here (16 rows, V 2048:
    # 64 tiles of 32 in 16 splits of 4) the tile rule alone would skip 44 tiles and both rules 48, and the
    # kernel's gradient must equal the exact one minus exactly those 48 tiles' terms, computed in float64.
    eps = 2.0**-7
    hidden, weight, targets, grad_out = lm_like_inputs(16, 16, 2048, sharpness=10.0, seed=5)
    exact = value_and_grads(IMPLS["triton"](filter_eps=None), hidden, weight, targets, grad_out, weight_grad=False)
    filtered = value_and_grads(IMPLS["triton"](filter_eps=eps), hidden, weight, targets, grad_out, weight_grad=False)
    n_tiles, n_splits = 64, 16
    p = torch.softmax(hidden.double() @ weight.double().T, dim=1)
    tile_mass = p.view(16, n_tiles, 32).sum(dim=2)
    split_mass = tile_mass.view(16, n_splits, 4).sum(dim=2).repeat_interleave(4, dim=1)
    has_target = torch.zeros(n_tiles, dtype=torch.bool, device=DEVICE)
    has_target[targets // 32] = True
    needs = (tile_mass >= eps / (2 * n_tiles)) & (split_mass > eps / (2 * n_splits))
    tile_only = ~(tile_mass >= eps / (2 * n_tiles)).any(dim=0) & ~has_target
    skipped = ~needs.any(dim=0) & ~has_target
    assert int(tile_only.sum()) == 44 and int(skipped.sum()) == 48
    dropped = p * skipped.repeat_interleave(32)[None, :]  # the skipped tiles' p (no targets there)
    expected = exact[1] + grad_out[:, None] * (dropped @ weight.double())  # dz = -g p on those entries
    torch.testing.assert_close(filtered[1], expected, rtol=0, atol=1e-6)
    assert (filtered[1] - exact[1]).abs().max() <= eps * grad_out.abs().max() * weight.double().abs().max()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_weight_only_gradients(impl: str) -> None:
    # Hidden frozen, weight trained (COMPUTE_DH off in the kernel): d weight against float64, and no
    # gradient for hidden at all.
    hidden, weight, targets, grad_out = make_inputs(37, 24, 123, torch.float32, logit_scale=6.0, seed=14)
    w = weight.detach().clone().requires_grad_(True)
    out = IMPLS[impl]()(hidden, w, targets)
    (out.double() * grad_out).sum().backward()
    w64 = weight.double().requires_grad_(True)
    logp = torch.log_softmax(hidden.double() @ w64.T, dim=1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    (torch.where(targets != -100, logp, 0.0) * grad_out).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), torch.where(targets != -100, logp, 0.0).detach(), rtol=0, atol=1e-5)
    assert not hidden.requires_grad and hidden.grad is None


def test_deterministic_runs_the_ordered_impl() -> None:
    # deterministic=True puts the torch impl (fixed-order chunk sums) where Triton would run: the same bits
    # as impl="torch", run after run, and still the float64 answer.
    hidden, weight, targets, grad_out = make_inputs(33, 17, 150, torch.float32, logit_scale=5.0, seed=9)
    det = lambda h, w, t: linear_logprobs(h, w, t, impl="triton", deterministic=True)  # noqa: E731
    first = value_and_grads(det, hidden, weight, targets, grad_out)
    again = value_and_grads(det, hidden, weight, targets, grad_out)
    plain = value_and_grads(lambda h, w, t: linear_logprobs(h, w, t, impl="torch"), hidden, weight, targets, grad_out)
    for a, b, c in zip(first[:3], again[:3], plain[:3], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    check_against_reference(det, hidden, weight, targets, grad_out, "deterministic")


def test_bad_filter_and_accumulator_names() -> None:
    hidden, weight, targets, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="filter must be one of"):
        linear_logprobs(hidden, weight, targets, filter="sometimes")
    with pytest.raises(ValueError, match="grad_accum must be one of"):
        linear_logprobs(hidden, weight, targets, grad_accum="fp8")
