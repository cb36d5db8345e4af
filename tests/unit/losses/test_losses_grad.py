"""torch.autograd.gradcheck (float64) through every loss, every AOT cost and both sorts."""

import pytest
import torch

from lowmem_sdpo.losses import LOSSES, preference_loss
from lowmem_sdpo.losses.aot import COSTS
from lowmem_sdpo.losses.soft_sort import soft_sort


def logps(n: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """Distinct float64 log-probs: the hard sort and the hinges are smooth away from ties and kinks."""
    g = torch.Generator().manual_seed(seed)
    base = -20 + spread * torch.randperm(4 * n, generator=g)[:n].to(torch.float64)
    return (base + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()


def check(name: str, n_chosen: int = 5, n_rejected: int = 5, **options) -> None:
    inputs = (logps(n_chosen, 1), logps(n_rejected, 2), logps(n_chosen, 3), logps(n_rejected, 4))

    def fn(*tensors):
        return preference_loss(name, *tensors, **options)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)  # outputs reach ~1e3: rounding ~1e-7


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sigmoid(label_smoothing):
    check("sigmoid", beta=0.1, label_smoothing=label_smoothing)


def test_ipo():
    check(
        "ipo",
        beta=0.1,
        chosen_tokens=torch.tensor([3, 5, 7, 2, 9]),
        rejected_tokens=torch.tensor([4, 1, 6, 8, 2]),
    )


def test_hinge():
    check("hinge", beta=0.05)


def test_dpop():
    # Seeds 1 and 3 put pc above and below rc for different examples: both branches of the penalty.
    check("dpop", beta=0.1, dpop_lambda=5.0)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("sort", ["hard", "soft"])
def test_aot(name, cost, sort):
    check(name, beta=0.5, aot_cost=cost, aot_sort=sort, aot_temperature=0.7)


def test_kto_with_kl_and_unequal_sides():
    policy_kl, ref_kl = logps(4, 5), logps(4, 6)
    check("kto", n_chosen=3, n_rejected=6, beta=0.1, policy_kl=policy_kl, ref_kl=ref_kl, desirable_weight=1.5)


def test_kto_reference_point_is_detached():
    policy_kl, ref_kl = logps(4, 5), logps(4, 6)
    with torch.no_grad():
        policy_kl += 30  # make the KL estimate positive so the clamp does not hide a gradient
    losses, _, _ = preference_loss(
        "kto",
        logps(2, 1),
        logps(2, 2),
        logps(2, 3),
        logps(2, 4),
        beta=0.1,
        policy_kl=policy_kl,
        ref_kl=ref_kl,
    )
    losses.sum().backward()
    assert policy_kl.grad is None and ref_kl.grad is None


@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
def test_soft_sort(temperature):
    assert torch.autograd.gradcheck(lambda v: soft_sort(v, temperature), (logps(6, 7, spread=0.2),))


def test_every_loss_is_covered():
    covered = {"sigmoid", "ipo", "hinge", "dpop", "aot", "aot_unpaired", "kto"}
    assert set(LOSSES) == covered
