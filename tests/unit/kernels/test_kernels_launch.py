"""The Triton kernels' launch and indexing (issue 13), under the interpreter on CPU: grouped tile order,
the valid-row index read in place, strided inputs, 64-bit offsets past 2**31, the accumulator dtype."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_sdpo_kernels import TritonConfig, linear_logprobs, valid_rows
from lowmem_sdpo_kernels.triton_tiles import _grouped_tile, grouped_order
from tests.support.kernel_cases import DEVICE, SyncOps, check_against_reference, make_inputs, value_and_grads

SMALL = TritonConfig(block_m=16, block_v=16, block_d=16, num_warps=1, num_stages=1, group_m=3)


def _triton(cfg: TritonConfig = SMALL, **kw):
    return lambda h, w, t, **head: linear_logprobs(h, w, t, impl="triton", triton_config=cfg, **head, **kw)


@pytest.mark.parametrize(("n_m", "n_v", "group"), [(7, 5, 3), (8, 4, 8), (1, 9, 4), (10, 1, 4), (5, 3, 1)])
def test_grouped_order_visits_every_tile_once_group_by_group(n_m: int, n_v: int, group: int) -> None:
    order = [grouped_order(pid, n_m, n_v, group) for pid in range(n_m * n_v)]
    assert sorted(order) == [(m, v) for m in range(n_m) for v in range(n_v)]
    # Inside a group the row block varies fastest: consecutive programs share a vocabulary tile, and a
    # group's row blocks finish the whole vocabulary before the next group starts.
    for pid, (m, v) in enumerate(order):
        first = (pid // (group * n_v)) * group
        assert first <= m < min(first + group, n_m)
        size = min(n_m - first, group)
        assert v == (pid - first * n_v) // size


@triton.jit
def _order_kernel(OUT, n_m, n_v, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    m, v = _grouped_tile(pid, n_m, n_v, GROUP_M)
    tl.store(OUT + 2 * pid, m)
    tl.store(OUT + 2 * pid + 1, v)


def test_kernel_swizzle_is_the_host_mirror() -> None:
    n_m, n_v, group = 7, 5, 3
    out = torch.empty(2 * n_m * n_v, dtype=torch.int32, device=DEVICE)
    _order_kernel[(n_m * n_v,)](out, n_m, n_v, GROUP_M=group)
    got = [tuple(p) for p in out.view(-1, 2).tolist()]
    assert got == [grouped_order(pid, n_m, n_v, group) for pid in range(n_m * n_v)]


@pytest.mark.parametrize("group_m", [1, 3, 64])
def test_group_size_changes_no_value(group_m: int) -> None:
    # The launch order decides which tiles share the cache, never what a tile computes: forward bits are
    # identical; the backward's atomics may add in another order (fp32 rounding only).
    hidden, weight, targets, grad_out = make_inputs(40, 24, 90, torch.float32, seed=3)
    cfg = TritonConfig(16, 16, 16, 1, 1, group_m=group_m)
    base = value_and_grads(_triton(TritonConfig(16, 16, 16, 1, 1, group_m=8)), hidden, weight, targets, grad_out)
    got = value_and_grads(_triton(cfg), hidden, weight, targets, grad_out)
    assert torch.equal(got[0], base[0])
    for a, b in zip(got[1:3], base[1:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_rows_are_read_in_place_without_syncs_or_copies() -> None:
    # rows= goes to the kernels: no index_select of hidden (no [K, D] copy), no index_put / scatter of its
    # gradient, and none of the ops that would make the host wait for a GPU.
    hidden, weight, targets, grad_out = make_inputs(45, 16, 70, torch.float32, ignore_frac=0.5, seed=6)
    rows = valid_rows(targets.cpu(), 70).to(DEVICE)
    with _Ops() as ops, SyncOps() as syncs:
        got = value_and_grads(_triton(rows=rows), hidden, weight, targets, grad_out)
    assert syncs.seen == []
    assert not {"aten::index_select", "aten::index_put", "aten::index_put_", "aten::scatter"} & set(ops.names)
    ref = value_and_grads(_triton(), hidden, weight, targets, grad_out)  # checked path, same kernels
    for a, b in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert (got[1][targets == -100] == 0).all()  # ignored rows: zero gradient, never touched


def test_strided_inputs_are_read_in_place() -> None:
    # hidden every other column of a wider tensor, weight column-major (a transposed view), targets every
    # other entry: no .contiguous() copy is needed, and the values match float64.
    hidden, weight, targets, grad_out = make_inputs(37, 24, 123, torch.float32, seed=8)
    wide = torch.zeros(37, 48, device=DEVICE)
    wide[:, ::2] = hidden
    h_view = wide[:, ::2]
    w_view = weight.T.contiguous().T
    t_long = torch.full((74,), -100, device=DEVICE)
    t_long[::2] = targets
    t_view = t_long[::2]
    assert not (h_view.is_contiguous() or w_view.is_contiguous() or t_view.is_contiguous())
    check_against_reference(_triton(), h_view, w_view, t_view, grad_out, "strided")


def test_n_times_v_past_two_to_the_31() -> None:
    # N * V = 2**22 * 1024 = 2**32 with D = 2: row indices above 2**21, where a flat row * V index (a
    # logits-shaped offset) would overflow int32; the kernels index rows in int64 and never form one.
    # Only 24 rows at the end carry a target, so the grid is one row block (the interpreter stays fast).
    n, d, v = 2**22, 2, 1024
    gen = torch.Generator().manual_seed(0)
    hidden = torch.zeros(n, d)
    weight = torch.randn(v, d, generator=gen)
    targets = torch.full((n,), -100)
    valid = torch.arange(n - 24, n)
    hidden[valid] = torch.randn(24, d, generator=gen) * 2.0
    targets[valid] = torch.randint(0, v, (24,), generator=gen)
    rows = valid_rows(targets, v)
    assert rows[0] * v > 2**31
    h = hidden.clone().to(DEVICE).requires_grad_(True)
    w = weight.clone().to(DEVICE).requires_grad_(True)
    cfg = TritonConfig(32, 128, 16, 1, 1)
    grad = torch.randn(24, generator=gen, dtype=torch.float64)
    out = linear_logprobs(h, w, targets.to(DEVICE), impl="triton", triton_config=cfg, rows=rows.to(DEVICE))
    (out[valid].double() * grad.to(DEVICE)).sum().backward()
    h64 = hidden[valid].double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ w64.T, dim=1).gather(1, targets[valid, None]).squeeze(1)
    (ref * grad).sum().backward()
    torch.testing.assert_close(out[valid].double().cpu(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad[valid].double().cpu(), h64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=0, atol=1e-5)
    assert float(out.detach()[: n - 24].abs().max()) == 0.0 and float(h.grad[: n - 24].abs().max()) == 0.0


def test_input_dtype_accumulators_round_once_per_atomic() -> None:
    # grad_accum="input" (CCE's half-precision atomics): fp16 inputs, dH and dW accumulated in fp16. Each
    # of the n_tiles (n_row_blocks) atomic adds into an element rounds once, so against float64 the error
    # is at most about n_adds * eps16 * (sum of |terms|) on top of the fp32-accumulating kernel's.
    hidden, weight, targets, grad_out = make_inputs(40, 24, 96, torch.float16, logit_scale=4.0, seed=4)
    fp32_acc = value_and_grads(_triton(), hidden, weight, targets, grad_out)
    half_acc = value_and_grads(_triton(grad_accum="input"), hidden, weight, targets, grad_out)
    assert torch.equal(half_acc[0], fp32_acc[0])  # the forward has no atomics
    h64, w64 = hidden.double(), weight.double()
    p = torch.softmax(h64 @ w64.T, dim=1)
    valid = (targets != -100).double()
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), 96).double()
    dz_abs = ((onehot - p) * (grad_out * valid)[:, None]).abs()
    eps16 = torch.finfo(torch.float16).eps
    n_vtiles, n_mblocks = 96 // 16, -(-40 // 16)
    bound_h = (n_vtiles + 1) * eps16 * (dz_abs @ w64.abs())
    bound_w = (n_mblocks + 1) * eps16 * (dz_abs.T @ h64.abs())
    assert ((half_acc[1] - fp32_acc[1]).abs() <= bound_h + 1e-6).all()
    assert ((half_acc[2] - fp32_acc[2]).abs() <= bound_w + 1e-6).all()
    assert not torch.equal(half_acc[1], fp32_acc[1])  # the flag did reach the kernel
