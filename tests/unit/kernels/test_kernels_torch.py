"""The chunked plain-torch implementation (impl="torch"): accuracy, memory bound, filtering."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo_kernels import TorchChunks, linear_logprobs
from lowmem_sdpo_kernels.configs import OpOptions
from lowmem_sdpo_kernels.logit_transform import resolve_transform
from lowmem_sdpo_kernels.torch_chunked import torch_linear_logprobs
from tests.support.kernel_cases import (
    DEVICE,
    HEAD_CASES,
    check_against_reference,
    largest_tensor,
    make_head,
    make_inputs,
    value_and_grads,
)

SMALL_CHUNKS = TorchChunks(rows=16, vocab=32)  # many row and vocabulary chunks at test sizes


def _chunked(chunks: TorchChunks, filter_eps: float | None = None):
    """impl='torch' with explicit chunk sizes, behind the public compaction of ignored rows."""

    def fn(h, w, t, bias=None, logit_scale=1.0, softcap=None):
        rows = (t != -100).nonzero().squeeze(1)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        options = OpOptions(filter_eps, None, resolve_transform(logit_scale, softcap))
        core = torch_linear_logprobs(h.index_select(0, rows), w, bias, t.index_select(0, rows), options, chunks)
        return out.index_copy(0, rows, core.float())

    return fn


SHAPES = [  # (N, D, V, logit scale): odd sizes, and logits in the hundreds
    (37, 24, 123, 3.0),
    (64, 16, 300, 120.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_public_torch_impl_matches_float64(dtype: torch.dtype, shape) -> None:
    n, d, v, scale = shape
    hidden, weight, targets, grad_out = make_inputs(n, d, v, dtype, logit_scale=scale, seed=n + v)
    fn = lambda h, w, t: linear_logprobs(h, w, t, impl="torch")  # noqa: E731
    check_against_reference(fn, hidden, weight, targets, grad_out, f"torch {dtype} {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable", "frozen"])
def test_many_chunks_match_float64(dtype: torch.dtype, weight_grad: bool) -> None:
    hidden, weight, targets, grad_out = make_inputs(53, 20, 211, dtype, logit_scale=40.0, seed=3)
    check_against_reference(
        _chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out, f"chunks {dtype}", weight_grad=weight_grad
    )


def test_large_logits_stay_finite() -> None:
    # Logits of magnitude ~500: a naive exp would overflow fp32 (e^89 > 3.4e38).
    hidden, weight, targets, grad_out = make_inputs(40, 32, 150, torch.float32, logit_scale=300.0, seed=7)
    out, dh, dw, _ = value_and_grads(_chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out)
    assert (hidden.double() @ weight.double().T).abs().max() > 300
    assert torch.isfinite(out).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    check_against_reference(_chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out, "large logits")


def test_torch_impl_never_builds_n_by_v() -> None:
    n, d, v = 300, 16, 700
    naive = largest_tensor(lambda h, w, t: linear_logprobs(h, w, t, impl="naive"), weight_grad=True)
    assert naive.numel >= n * v, "the probe must see the naive [N, V] logits, else it proves nothing"
    trainable = largest_tensor(_chunked(SMALL_CHUNKS), weight_grad=True)
    # Largest allowed: the fp32 [V, D] weight-gradient accumulator.
    assert trainable.numel <= v * d, trainable.op
    frozen = largest_tensor(_chunked(SMALL_CHUNKS), weight_grad=False)
    # Frozen weight: no dW work, so nothing weight-sized is created; [N, D] grad of hidden is largest.
    assert frozen.numel <= n * d, frozen.op


def test_filtering_respects_its_mass_budget() -> None:
    # filter_eps = 0.3 lets a row drop up to 0.3 of softmax mass, so the gradient of hidden row n
    # may move by at most |g_n| * 0.3 * max|W|, and the weight gradient in total (sum over all
    # entries) by at most sum_n |g_n| * 0.3 * sum_d |h_nd| per vocabulary row touched.
    eps = 0.3
    chunks = TorchChunks(rows=4, vocab=32)
    hidden, weight, targets, grad_out = make_inputs(48, 16, 400, torch.float32, logit_scale=8.0, seed=11)
    # Three rows in four target their most likely token, as for a trained model (their light
    # chunks are skippable); every fourth keeps a random, usually unlikely, target whose chunk
    # must not be skipped: dropping it would move that row's gradient by about |W_target|.
    likely = (hidden @ weight.T).argmax(dim=1)
    keep_random = torch.arange(48, device=DEVICE) % 4 == 0
    targets = torch.where((targets == -100) | keep_random, targets, likely)
    exact = value_and_grads(_chunked(chunks), hidden, weight, targets, grad_out)
    filtered = value_and_grads(_chunked(chunks, filter_eps=eps), hidden, weight, targets, grad_out)
    torch.testing.assert_close(filtered[0], exact[0], rtol=0, atol=0)  # the forward never filters
    dh_err = (filtered[1] - exact[1]).abs().amax(dim=1)
    bound_h = grad_out.abs() * eps * weight.double().abs().max() + 1e-6
    assert (dh_err <= bound_h).all(), (dh_err - bound_h).max()
    dw_err = (filtered[2] - exact[2]).abs().sum()
    bound_w = (grad_out.abs() * eps * hidden.double().abs().sum(dim=1)).sum() + 1e-6
    assert dw_err <= bound_w
    assert dh_err.max() > 0, "with this budget some chunks must be skipped, or the test checks nothing"


def test_all_rows_ignored_gives_zeros_and_zero_grads() -> None:
    hidden, weight, _, _ = make_inputs(6, 8, 20, torch.float32)
    targets = torch.full((6,), -100, device=DEVICE)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    out = linear_logprobs(h, w, targets, impl="torch")
    assert out.dtype == torch.float32 and out.shape == (6,) and (out == 0).all()
    out.sum().backward()  # still part of the graph
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_head_transforms_match_float64(dtype: torch.dtype, case: str) -> None:
    # Odd sizes over many row and vocabulary chunks, a third of the rows ignored; weight and bias
    # trainable, so d hidden, d weight and d bias are all checked against the float64 reference.
    hidden, weight, targets, grad_out = make_inputs(53, 20, 211, dtype, logit_scale=20.0, seed=4)
    head = make_head(211, dtype, seed=4, **HEAD_CASES[case])
    check_against_reference(_chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out, f"{case} {dtype}", head=head)
    public = lambda h, w, t, **kw: linear_logprobs(h, w, t, impl="torch", **kw)  # noqa: E731
    check_against_reference(public, hidden, weight, targets, grad_out, f"public {case} {dtype}", head=head)


def test_head_with_frozen_weight_and_bias() -> None:
    hidden, weight, targets, grad_out = make_inputs(40, 24, 150, torch.float32, logit_scale=10.0, seed=6)
    head = make_head(150, torch.float32, seed=6, **HEAD_CASES["all"])
    check_against_reference(
        _chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out, "frozen", weight_grad=False, head=head,
        bias_grad=False,
    )
    # A trainable bias with a frozen weight still gets its gradient (and nothing weight-sized is built).
    check_against_reference(
        _chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out, "bias only", weight_grad=False, head=head
    )


def test_zero_bias_and_unit_scale_change_nothing() -> None:
    # x + 0 and no multiply are exact, so a zero bias must reproduce the bias-free run bit for bit, in
    # the forward and in every gradient: the bias path touches nothing else.
    hidden, weight, targets, grad_out = make_inputs(37, 24, 123, torch.float32, logit_scale=5.0, seed=8)
    plain = value_and_grads(_chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out)
    zero = {"bias": torch.zeros(123, device=DEVICE), "logit_scale": 1.0, "softcap": None}
    biased = value_and_grads(_chunked(SMALL_CHUNKS), hidden, weight, targets, grad_out, head=zero)
    for a, b in zip(plain[:3], biased[:3], strict=True):
        assert torch.equal(a, b)


def test_filtering_with_head_respects_its_scaled_budget() -> None:
    # With a head transform the dropped entries of d logp / d x are g * scale * (1 - tanh^2) * p, so
    # the per-row bound of the hidden gradient error gains the factor |scale| (configs.py).
    eps = 0.3
    chunks = TorchChunks(rows=4, vocab=32)
    hidden, weight, targets, grad_out = make_inputs(48, 16, 400, torch.float32, logit_scale=8.0, seed=11)
    head = make_head(400, torch.float32, seed=11, bias_std=1.0, logit_scale=2.5, softcap=30.0)
    likely = (hidden @ weight.T + head["bias"]).argmax(dim=1)
    keep_random = torch.arange(48, device=DEVICE) % 4 == 0
    targets = torch.where((targets == -100) | keep_random, targets, likely)
    exact = value_and_grads(_chunked(chunks), hidden, weight, targets, grad_out, head=head)
    filtered = value_and_grads(_chunked(chunks, filter_eps=eps), hidden, weight, targets, grad_out, head=head)
    torch.testing.assert_close(filtered[0], exact[0], rtol=0, atol=0)  # the forward never filters
    scale = abs(head["logit_scale"])
    dh_err = (filtered[1] - exact[1]).abs().amax(dim=1)
    bound_h = grad_out.abs() * eps * scale * weight.double().abs().max() + 1e-6
    assert (dh_err <= bound_h).all(), (dh_err - bound_h).max()
    db_err = (filtered[3] - exact[3]).abs().sum()
    assert db_err <= eps * scale * grad_out.abs().sum() + 1e-6
    assert dh_err.max() > 0, "with this budget some chunks must be skipped, or the test checks nothing"
