"""The half-precision tolerance rule: 10x the fp32 error, with fp32 floors (tests/unit/kernels/test_kernels_precision.py
explains it; tests/gpu applies it to the compiled kernels)."""

from __future__ import annotations

import torch

from tests.support.kernel_cases import FP32_EPS, reference_logprobs, value_and_grads

FACTOR = 10.0


def _dz_abs(hidden, weight, targets, grad_out) -> torch.Tensor:
    """|d(sum g * logp) / d z| in float64: |g_n (onehot - p)|, 0 on ignored rows."""
    p = torch.softmax(hidden.double() @ weight.double().T, dim=1)
    valid = targets != -100
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), weight.shape[0]).double()
    return ((onehot - p) * torch.where(valid, grad_out.double(), 0.0)[:, None]).abs()


def dz_rounding_bound(hidden, weight, targets, grad_out) -> list:
    """What rounding dz (and the finished gradient) to the inputs' dtype may cost one run, per output: 0 for
    logp (fp32), eps * (|dz| @ |W|) for d hidden and eps * (|dz|^T @ |h|) for d weight, entry by entry."""
    eps = torch.finfo(hidden.dtype).eps
    dz = _dz_abs(hidden, weight, targets, grad_out)
    return [0.0, eps * (dz @ weight.double().abs()), eps * (dz.T @ hidden.double().abs())]


def fp32_floors(truth: tuple, z_max: float) -> list[float]:
    """A few fp32 roundings per output, the least the fp32 error counts as (it may be 0 by luck)."""
    return [
        4 * FP32_EPS * (z_max + truth[0].abs().max().item()),
        4 * FP32_EPS * max(z_max, 1.0) * truth[1].abs().max().item(),
        4 * FP32_EPS * max(z_max, 1.0) * truth[2].abs().max().item(),
    ]


def half_tolerances(fn, hidden, weight, targets, grad_out, fn32=None) -> tuple[list, list]:
    """(errors of fn at the inputs' dtype, allowed errors) for logp, d hidden, d weight, elementwise
    maxima per output (tensors for the gradients, so that the dz bound applies entry by entry). fn32:
    the fp32 run, when fn's tile does not fit fp32 (default: fn itself)."""
    truth = value_and_grads(reference_logprobs, hidden.double(), weight.double(), targets, grad_out)
    fp32 = value_and_grads(fn32 or fn, hidden.float(), weight.float(), targets, grad_out)
    got = value_and_grads(fn, hidden, weight, targets, grad_out)
    z_max = (hidden.double() @ weight.double().T).abs().max().item()
    floors, rounding = fp32_floors(truth, z_max), dz_rounding_bound(hidden, weight, targets, grad_out)
    errors, allowed = [], []
    for i in range(3):
        err32 = (fp32[i] - truth[i]).abs().max().item()
        errors.append((got[i] - truth[i]).abs())
        allowed.append(FACTOR * max(err32, floors[i]) + rounding[i])
    return errors, allowed


def check_half_precision(fn, hidden, weight, targets, grad_out, label: str, fn32=None) -> None:
    errors, allowed = half_tolerances(fn, hidden, weight, targets, grad_out, fn32)
    for name, err, tol in zip(("logp", "grad_hidden", "grad_weight"), errors, allowed, strict=True):
        excess = (err - tol).max().item()
        assert excess <= 0, f"{label}: {name} error exceeds its tolerance by {excess:.3e} (max err {err.max():.3e})"
