"""Hand-worked checks of the float64 reference helper and the ops on tiny vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem_sdpo_kernels import linear_logprobs
from tests.support.kernel_cases import DEVICE, reference_logprobs


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
