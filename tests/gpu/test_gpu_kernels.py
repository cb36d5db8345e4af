"""Issue 13's GPU checks of the compiled kernels (bf16 above all, which the interpreter cannot run). Run with

    LOWMEM_SDPO_TEST_CUDA=1 python -m pytest -m gpu tests/gpu/test_gpu_kernels.py

Every test is marked `gpu` and has "kernel" in its name (benchmarks/gpu_pass.sh kernels selects -k kernel).
The tolerances are the CPU tests' own (tests/unit/kernels/test_kernels_precision.py, tests/unit/kernels/test_kernels_filter.py), at
shapes where the 128 x 128 tiles, the grouped order and the vocabulary splits all matter.
"""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo_kernels import TritonConfig, linear_logprobs, valid_rows
from lowmem_sdpo_kernels.configs import AUTOTUNE_TRITON_CONFIGS, OpOptions
from lowmem_sdpo_kernels.triton_logprobs import call_launches, compiled_shared_bytes
from tests.support.half_precision import check_half_precision
from tests.support.kernel_cases import lm_like_inputs, make_inputs, value_and_grads

pytestmark = pytest.mark.gpu

# 1536 rows (12 row blocks of 128, so 1.5 groups of 8), D 512, V 32000 (250 vocabulary tiles, 16 splits).
N, D, V = 1536, 512, 32000


def _triton(**kw):
    return lambda h, w, t: linear_logprobs(h, w, t, impl="triton", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compiled_kernel_half_precision_within_ten_times_fp32(impl: str, dtype: torch.dtype) -> None:
    # impl="torch" on CUDA takes the torch.mm(out_dtype=fp32) path for half inputs.
    hidden, weight, targets, grad_out = make_inputs(N, D, V, dtype, logit_scale=8.0, seed=31, device="cuda")
    fn = lambda h, w, t: linear_logprobs(h, w, t, impl=impl, filter_eps=None)  # noqa: E731
    check_half_precision(fn, hidden, weight, targets, grad_out, f"{impl} {dtype} {N}x{D}x{V}")


@pytest.mark.parametrize("cfg", AUTOTUNE_TRITON_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_v}x{c.block_d}w{c.num_warps}"
                         f"s{c.num_stages}g{c.group_m}")
def test_compiled_kernel_every_autotune_config_is_right(cfg: TritonConfig) -> None:
    # Every tile the tuner may pick (spilling or not) computes the same numbers: bf16 within the tolerance.
    # A tile this card cannot hold is skipped, by the compiler's own count for these very launches (what the
    # tuner's filter reads), never by the estimate, which undercounts.
    hidden, weight, targets, grad_out = make_inputs(640, 256, 8000, torch.bfloat16, logit_scale=8.0, seed=32,
                                                    device="cuda")
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    need = compiled_shared_bytes(call_launches(cfg, hidden, weight, None, targets, None, OpOptions(), (True, True, False)))
    if need is None or need > limit:
        pytest.skip(f"needs {need} B of shared memory (compiled), this card has {limit}")
    check_half_precision(_triton(triton_config=cfg, filter_eps=None), hidden, weight, targets, grad_out, str(cfg),
                         fn32=_triton(filter_eps=None))  # a half tile may not fit fp32's shared memory


def test_compiled_kernel_rows_index_matches_the_checked_path() -> None:
    hidden, weight, targets, grad_out = make_inputs(N, D, V, torch.bfloat16, ignore_frac=0.5, seed=33, device="cuda")
    rows = valid_rows(targets.cpu(), V).cuda()
    given = value_and_grads(_triton(rows=rows, filter_eps=None), hidden, weight, targets, grad_out)
    checked = value_and_grads(_triton(filter_eps=None), hidden, weight, targets, grad_out)
    assert torch.equal(given[0], checked[0])
    for a, b in zip(given[1:3], checked[1:3], strict=True):  # atomics: another order, fp32 roundings apart
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
    assert (given[1][targets == -100] == 0).all()


def test_compiled_kernel_input_dtype_atomics_stay_close() -> None:
    # grad_accum="input": bf16 atomics. Each element takes n_tiles (dH) or n_row_blocks (dW) adds, each
    # rounding once: bounded by (adds + 1) * eps_bf16 * the sum of |terms| (as the fp16 CPU test).
    hidden, weight, targets, grad_out = make_inputs(512, 256, 4096, torch.bfloat16, logit_scale=4.0, seed=34,
                                                    device="cuda")
    fp32_acc = value_and_grads(_triton(filter_eps=None), hidden, weight, targets, grad_out)
    bf16_acc = value_and_grads(_triton(filter_eps=None, grad_accum="input"), hidden, weight, targets, grad_out)
    p = torch.softmax(hidden.double() @ weight.double().T, dim=1)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), 4096).double()
    dz = ((onehot - p) * torch.where(targets != -100, grad_out, 0.0)[:, None]).abs()
    eps = torch.finfo(torch.bfloat16).eps
    assert ((bf16_acc[1] - fp32_acc[1]).abs() <= (4096 // 128 + 2) * eps * (dz @ weight.double().abs())).all()
    assert ((bf16_acc[2] - fp32_acc[2]).abs() <= (512 // 128 + 2) * eps * (dz.T @ hidden.double().abs())).all()


def test_compiled_kernel_element_filter_error_is_what_it_dropped() -> None:
    # As the CPU test, at bf16-sized tiles (128 x 128) on LM-like rows.
    hidden, weight, targets, grad_out = lm_like_inputs(1024, 64, 8192, seed=35)
    hidden, weight, targets, grad_out = hidden.cuda(), weight.cuda(), targets.cuda(), grad_out.cuda()
    eps = 2.0**-12
    exact = value_and_grads(_triton(filter_eps=None), hidden, weight, targets, grad_out)
    filtered = value_and_grads(_triton(filter="element", filter_eps=eps), hidden, weight, targets, grad_out)
    p = torch.softmax(hidden.double() @ weight.double().T, dim=1)
    dropped = p * (p < eps * (1 + 1e-5))
    g = grad_out.abs()
    err_h = (filtered[1] - exact[1]).abs().amax(dim=1)
    assert (err_h <= g * (dropped @ weight.double().abs().amax(dim=1)) + 1e-5).all()
    err_w = (filtered[2] - exact[2]).abs().amax(dim=1)
    assert (err_w <= (dropped * g[:, None]).T @ hidden.double().abs().amax(dim=1) + 1e-5).all()


def test_compiled_kernel_deterministic_mode_repeats_bit_for_bit() -> None:
    hidden, weight, targets, grad_out = make_inputs(N, D, V, torch.bfloat16, seed=36, device="cuda")
    det = lambda h, w, t: linear_logprobs(h, w, t, deterministic=True)  # noqa: E731
    first = value_and_grads(det, hidden, weight, targets, grad_out)
    for _ in range(2):
        again = value_and_grads(det, hidden, weight, targets, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(first[:3], again[:3], strict=True))


def test_compiled_kernel_autotune_picks_a_config() -> None:
    hidden, weight, targets, grad_out = make_inputs(1024, 256, 8000, torch.bfloat16, seed=37, device="cuda")
    got = value_and_grads(_triton(triton_config="autotune", filter_eps=None), hidden, weight, targets, grad_out)
    check_half_precision(_triton(triton_config="autotune", filter_eps=None), hidden, weight, targets, grad_out,
                         "autotuned")
    assert got[0].isfinite().all()


def test_compiled_kernel_torch_impl_makes_no_sync_per_chunk() -> None:
    # Issue 13 item 7: on CUDA the torch impl never reads a chunk's mass on the host (its filter is off
    # there), so with rows= given a forward + backward issues no syncing op at all, filter "auto" or not.
    from tests.support.kernel_cases import SyncOps

    hidden, weight, targets, grad_out = make_inputs(4096, 256, 20000, torch.bfloat16, ignore_frac=0.3, seed=38,
                                                    device="cuda")
    rows = valid_rows(targets.cpu(), 20000).cuda()
    fn = lambda h, w, t: linear_logprobs(h, w, t, impl="torch", rows=rows)  # noqa: E731
    with SyncOps() as probe:
        value_and_grads(fn, hidden, weight, targets, grad_out)
    assert probe.seen == []
