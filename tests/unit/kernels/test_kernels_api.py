"""Public API of lowmem_sdpo_kernels: impl registry, input checks, sequence_logprobs."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo_kernels import IMPLS, linear_logprobs, resolve_impl, sequence_logprobs, valid_rows
from tests.support.kernel_cases import DEVICE, SyncOps, make_head, make_inputs


def test_unknown_impl_lists_known_ones() -> None:
    hidden, weight, targets, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"unknown impl 'fast'; known: auto, naive, torch, triton"):
        linear_logprobs(hidden, weight, targets, impl="fast")
    assert set(IMPLS) == {"naive", "torch", "triton"}


def test_auto_follows_the_device() -> None:
    assert resolve_impl("auto", torch.zeros(1)) == "torch"
    assert resolve_impl("auto", torch.zeros(1, device="meta")) == "torch"


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "targets_shape", "pattern"),
    [
        ((4, 8), (10, 7), (4,), "shape mismatch"),
        ((4, 8), (10, 8), (5,), "shape mismatch"),
        ((2, 4, 8), (10, 8), (8,), "expected hidden"),
    ],
)
def test_bad_shapes_are_named(hidden_shape, weight_shape, targets_shape, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        linear_logprobs(torch.zeros(hidden_shape), torch.zeros(weight_shape), torch.zeros(targets_shape, dtype=torch.long))


def test_bad_dtypes_and_targets() -> None:
    hidden, weight, _, _ = make_inputs(4, 8, 10, torch.float32)
    targets = torch.tensor([1, 2, -100, 3], device=DEVICE)
    with pytest.raises(ValueError, match="share one float dtype"):
        linear_logprobs(hidden, weight.half(), targets)
    with pytest.raises(ValueError, match="int64"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match=r"targets\[1\] = 10 is outside \[0, 10\)"):
        linear_logprobs(hidden, weight, torch.tensor([1, 10, -100, 3], device=DEVICE))
    with pytest.raises(ValueError, match="filter_eps"):
        linear_logprobs(hidden, weight, targets, filter_eps="sometimes")
    with pytest.raises(ValueError, match="filter_eps"):
        linear_logprobs(hidden, weight, targets, filter_eps=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"bias": torch.zeros(9)}, r"bias must be \[V\] = \[10\]"),
        ({"bias": torch.zeros(10, dtype=torch.float64)}, "bias must share the weight's dtype"),
        ({"logit_scale": 0.0}, "logit_scale must be a finite non-zero"),
        ({"logit_scale": float("inf")}, "logit_scale must be a finite non-zero"),
        ({"softcap": 0.0}, "softcap must be None or a finite float > 0"),
        ({"softcap": -30.0}, "softcap must be None or a finite float > 0"),
        ({"softcap": float("nan")}, "softcap must be None or a finite float > 0"),
    ],
)
def test_bad_head_arguments_are_named(kwargs, pattern) -> None:
    hidden, weight, targets, _ = make_inputs(4, 8, 10, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=pattern):
        linear_logprobs(hidden, weight, targets, impl="torch", **kwargs)


def test_custom_ignore_index() -> None:
    hidden, weight, _, _ = make_inputs(3, 8, 10, torch.float32)
    targets = torch.tensor([4, 0, 7], device=DEVICE)
    out = linear_logprobs(hidden, weight, targets, ignore_index=0, impl="torch")
    full = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    torch.testing.assert_close(out.double(), torch.stack([full[0, 4], full.new_zeros(()), full[2, 7]]), atol=1e-5, rtol=0)


def _per_sequence_reference(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None):
    """Float64 loop over sequences and positions: the definition, written out."""
    sums, counts = [], []
    for b in range(hidden.shape[0]):
        logits = hidden[b].double() @ weight.double().T
        if bias is not None:
            logits = logits + bias.double()
        logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits, dim=-1)
        total, count = torch.zeros((), dtype=torch.float64), 0
        for t in range(hidden.shape[1]):
            if int(labels[b, t]) != -100:
                total = total + logp[t, int(labels[b, t])]
                count += 1
        sums.append(total)
        counts.append(count)
    return torch.stack(sums), torch.tensor(counts)


@pytest.mark.parametrize("impl", ["torch", "triton", "auto"])
def test_sequence_logprobs_per_sequence(impl: str) -> None:
    batch, length, dim, vocab = 4, 9, 16, 57
    hidden, weight, labels, _ = make_inputs(batch * length, dim, vocab, torch.float32, seed=21)
    hidden = hidden.view(batch, length, dim).requires_grad_(True)
    labels = labels.view(batch, length).clone()
    labels[2] = -100  # one sequence with no labelled position at all
    labels[0, :3] = -100  # prompt-like prefix
    logp_sum, n_tokens = sequence_logprobs(hidden, weight, labels, impl=impl)
    ref_sum, ref_count = _per_sequence_reference(hidden.detach().cpu(), weight.cpu(), labels.cpu())
    assert logp_sum.dtype == torch.float32 and n_tokens.dtype == torch.int64
    assert logp_sum.shape == (batch,) and n_tokens.shape == (batch,)
    torch.testing.assert_close(logp_sum.double().cpu(), ref_sum, atol=1e-4, rtol=1e-6)
    assert n_tokens.cpu().tolist() == ref_count.tolist()
    assert n_tokens[2] == 0 and logp_sum[2] == 0
    logp_sum.sum().backward()
    assert (hidden.grad[2] == 0).all() and (hidden.grad[0, :3] == 0).all()
    assert hidden.grad[1].abs().sum() > 0


def test_sequence_logprobs_rejects_misaligned_labels() -> None:
    with pytest.raises(ValueError, match=r"labels \[B, T\]"):
        sequence_logprobs(torch.zeros(2, 5, 4), torch.zeros(7, 4), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sequence_logprobs_passes_the_head_through(impl: str) -> None:
    batch, length, dim, vocab = 3, 7, 16, 57
    hidden, weight, labels, _ = make_inputs(batch * length, dim, vocab, torch.float32, logit_scale=10.0, seed=22)
    head = make_head(vocab, torch.float32, bias_std=1.0, logit_scale=0.5, softcap=4.0, seed=22)
    labels = labels.view(batch, length)
    logp_sum, n_tokens = sequence_logprobs(hidden.view(batch, length, dim), weight, labels, impl=impl, **head)
    ref_sum, ref_count = _per_sequence_reference(
        hidden.view(batch, length, dim).cpu(), weight.cpu(), labels.cpu(),
        head["bias"].cpu(), head["logit_scale"], head["softcap"],
    )
    torch.testing.assert_close(logp_sum.double().cpu(), ref_sum, atol=1e-4, rtol=1e-6)
    assert n_tokens.cpu().tolist() == ref_count.tolist()
    plain, _ = sequence_logprobs(hidden.view(batch, length, dim), weight, labels, impl=impl)
    assert (plain - logp_sum).abs().max() > 0.1, "the head must matter here, or this checks nothing"


def _run(impl: str, hidden, weight, targets, grad_out, rows=None):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = linear_logprobs(h, w, targets, impl=impl, rows=rows)
    (out.double() * grad_out).sum().backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4, 1.0], ids=["none-ignored", "some-ignored", "all-ignored"])
def test_precomputed_rows_give_identical_results(impl: str, ignore_frac: float) -> None:
    hidden, weight, targets, grad_out = make_inputs(29, 16, 70, torch.float32, ignore_frac=ignore_frac, seed=5)
    rows = valid_rows(targets.cpu(), 70).to(DEVICE)  # host-side, as the engine does it
    assert rows.tolist() == (targets != -100).nonzero().squeeze(1).tolist()
    checked = _run(impl, hidden, weight, targets, grad_out)
    given = _run(impl, hidden, weight, targets, grad_out, rows=rows)
    for a, b in zip(checked, given, strict=True):
        assert torch.equal(a, b)


def test_sequence_logprobs_with_precomputed_rows() -> None:
    hidden, weight, labels, _ = make_inputs(4 * 9, 16, 57, torch.float32, seed=21)
    hidden, labels = hidden.view(4, 9, 16), labels.view(4, 9)
    rows = valid_rows(labels.cpu(), 57).to(DEVICE)
    with_rows = sequence_logprobs(hidden, weight, labels, impl="torch", rows=rows)
    without = sequence_logprobs(hidden, weight, labels, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(with_rows, without, strict=True))


def test_precomputed_rows_leave_no_syncing_op() -> None:
    # On CPU nothing syncs, but the ops that would on CUDA are visible: with rows= the forward and
    # backward issue none; without it the checked path issues its .any() and nonzero().
    hidden, weight, targets, grad_out = make_inputs(29, 16, 70, torch.float32, ignore_frac=0.4, seed=6)
    rows = valid_rows(targets.cpu(), 70).to(DEVICE)
    with SyncOps() as probe:
        _run("torch", hidden, weight, targets, grad_out, rows=rows)
    assert probe.seen == []
    with SyncOps() as probe:
        _run("torch", hidden, weight, targets, grad_out)
    assert "aten::nonzero" in probe.seen and "aten::_local_scalar_dense" in probe.seen


def test_rows_and_valid_rows_are_checked() -> None:
    hidden, weight, targets, _ = make_inputs(6, 8, 10, torch.float32, device="cpu")
    good = valid_rows(targets, 10)
    for bad in (good.int(), good[None], torch.arange(7)):
        with pytest.raises(ValueError, match="rows must be"):
            linear_logprobs(hidden, weight, targets, impl="torch", rows=bad)
    with pytest.raises(ValueError, match=r"targets\[1\] = 10 is outside \[0, 10\)"):
        valid_rows(torch.tensor([[3, 10], [-100, 2]]), 10)
