"""Each loss against values worked out by hand (arithmetic in the comments, floats from math.*)."""

import math

import pytest
import torch

from lowmem_sdpo.losses import preference_loss
from lowmem_sdpo.losses.soft_sort import soft_sort


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One pair used by the pairwise losses: pc=-10, pr=-14, rc=-11, rr=-12.
# chosen log-ratio pc-rc = 1, rejected log-ratio pr-rr = -2, so h = 1 - (-2) = 3.
PAIR = (t(-10.0), t(-14.0), t(-11.0), t(-12.0))


def test_sigmoid_dpo():
    losses, chosen, rejected = preference_loss("sigmoid", *PAIR, beta=0.1)
    # beta h = 0.3; -log sigmoid(0.3) = log(1 + e^-0.3) = 0.55436...
    assert losses.item() == pytest.approx(softplus(-0.3), rel=1e-12)
    # rewards: 0.1 * 1 and 0.1 * -2
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.2)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    losses, _, _ = preference_loss("sigmoid", *PAIR, beta=0.1, label_smoothing=0.2)
    # 0.8 * -log sigmoid(0.3) + 0.2 * -log sigmoid(-0.3) = 0.8 log(1+e^-0.3) + 0.2 log(1+e^0.3)
    assert losses.item() == pytest.approx(0.8 * softplus(-0.3) + 0.2 * softplus(0.3), rel=1e-12)


def test_ipo_averages_per_token():
    losses, chosen, _ = preference_loss(
        "ipo", *PAIR, beta=0.1, chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2])
    )
    # h = 1/4 - (-2)/2 = 0.25 + 1 = 1.25; 1/(2 beta) = 5; (1.25 - 5)^2 = 3.75^2 = 14.0625
    assert losses.item() == pytest.approx(14.0625, rel=1e-12)
    # rewards stay on summed log-probs: 0.1 * (pc - rc) = 0.1
    assert chosen.item() == pytest.approx(0.1)


def test_hinge_slic():
    losses, _, _ = preference_loss(
        "hinge", t(-10.0, -10.0), t(-14.0, -30.0), t(-11.0, -11.0), t(-12.0, -12.0), beta=0.1
    )
    # pair 1: relu(1 - 0.1 * 3) = 0.7; pair 2: h = 1 - (-18) = 19, relu(1 - 1.9) = 0
    assert losses.tolist() == pytest.approx([0.7, 0.0], abs=1e-12)


def test_dpop_penalises_chosen_below_reference():
    losses, _, _ = preference_loss(
        "dpop", t(-10.0, -12.0), t(-14.0, -16.0), t(-11.0, -11.0), t(-12.0, -12.0), beta=0.1, dpop_lambda=50.0
    )
    # pair 1: rc - pc = -11 + 10 = -1 -> penalty 0, loss = DPO = log(1 + e^-0.3)
    # pair 2: pc - rc = -1, pr - rr = -4, h = -1 + 4 = 3; penalty max(0, -11 + 12) = 1
    #         beta (h - 50 * 1) = 0.1 * -47 = -4.7, loss = log(1 + e^4.7)
    assert losses.tolist() == pytest.approx([softplus(-0.3), softplus(4.7)], rel=1e-12)


# AOT batch: pc=[-7,-9,-8], pr=[-10,-8,-10], rc=[-10,-6,-12], rr=[-10,-10,-10].
AOT_BATCH = (t(-7.0, -9.0, -8.0), t(-10.0, -8.0, -10.0), t(-10.0, -6.0, -12.0), t(-10.0, -10.0, -10.0))


def test_aot_paired_logistic_sorts_each_side():
    losses, chosen, _ = preference_loss("aot", *AOT_BATCH, beta=0.5)
    # policy log-ratios pc - pr = [3, -1, 2] -> sorted [-1, 2, 3]
    # reference log-ratios rc - rr = [0, 4, -2] -> sorted [-2, 0, 4]
    # delta per rank = [1, 2, -1]; beta delta = [0.5, 1, -0.5]
    expected = [softplus(-0.5), softplus(-1.0), softplus(0.5)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    # Unsorted, the deltas would be [3, -5, 4]: the sort changes the answer.
    assert chosen.tolist() == pytest.approx([0.5 * 3, 0.5 * -3, 0.5 * 4])  # beta (pc - rc)


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        # delta = [1, 2, -1], beta = 0.5 (the margin): max(0, 0.5 - d)^2 = [0, 0, 1.5^2]
        ("hinge2", [0.0, 0.0, 2.25]),
        # (0.5 - d)^2 = [0.25, 2.25, 2.25]
        ("lsq", [0.25, 2.25, 2.25]),
    ],
)
def test_aot_paired_other_costs(cost, expected):
    losses, _, _ = preference_loss("aot", *AOT_BATCH, beta=0.5, aot_cost=cost)
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_aot_unpaired_sorts_chosen_and_rejected_rewards():
    losses, _, _ = preference_loss("aot_unpaired", *AOT_BATCH, beta=0.5)
    # chosen pc - rc = [3, -3, 4] -> sorted [-3, 3, 4]; rejected pr - rr = [0, 2, 0] -> sorted [0, 0, 2]
    # delta = [-3, 3, 2]; beta delta = [-1.5, 1.5, 1]
    expected = [softplus(1.5), softplus(-1.5), softplus(-1.0)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_aot_logistic_label_smoothing():
    losses, _, _ = preference_loss("aot", *AOT_BATCH, beta=0.5, label_smoothing=0.1)
    # rank 3: beta delta = -0.5 -> 0.9 log(1 + e^0.5) + 0.1 log(1 + e^-0.5)
    assert losses[2].item() == pytest.approx(0.9 * softplus(0.5) + 0.1 * softplus(-0.5), rel=1e-12)


def test_kto_with_kl_reference_point_and_weights():
    # desirable: pc = [-10, -20], rc = [-11, -18] -> r_d = [1, -2]; undesirable: pr = [-14], rr = [-12] -> r_u = -2
    # KL: policy_kl - ref_kl = [-5 + 6, -6 + 6] = [1, 0], mean 0.5 -> z0 = 0.5
    losses, chosen, rejected = preference_loss(
        "kto",
        t(-10.0, -20.0),
        t(-14.0),
        t(-11.0, -18.0),
        t(-12.0),
        beta=0.1,
        policy_kl=t(-5.0, -6.0),
        ref_kl=t(-6.0, -6.0),
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    expected = [
        2.0 * (1 - sigmoid(0.1 * (1 - 0.5))),  # 2 (1 - sigmoid(0.05))
        2.0 * (1 - sigmoid(0.1 * (-2 - 0.5))),  # 2 (1 - sigmoid(-0.25))
        0.5 * (1 - sigmoid(0.1 * (0.5 - -2))),  # 0.5 (1 - sigmoid(0.25))
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert chosen.tolist() == pytest.approx([0.1, -0.2]) and rejected.tolist() == pytest.approx([-0.2])


def test_kto_negative_kl_estimate_clamps_to_zero_and_sides_may_be_empty():
    # policy_kl - ref_kl = [-5 + 6, -7 + 4] = [1, -3], mean -1 -> clamped to z0 = 0
    losses, chosen, rejected = preference_loss(
        "kto", t(-10.0), t(), t(-11.0), t(), beta=0.1, policy_kl=t(-5.0, -7.0), ref_kl=t(-6.0, -4.0)
    )
    # only one desirable example, r = 1: 1 - sigmoid(0.1)
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.1)], rel=1e-12)
    assert chosen.shape == (1,) and rejected.shape == (0,)


def test_soft_sort_two_values_by_hand():
    # n = 2: B_1 = B_2 = |a - b| cancel inside each row's softmax.
    # row 1 logits (2*1 - 3) s / tau = -s: weights on [a=1, b=0] are [e^-1, 1] / (1 + e^-1) -> value sigmoid(-1)
    # row 2 logits (2*2 - 3) s / tau = s: weights [e, 1] / (e + 1) -> value sigmoid(1)
    out = soft_sort(t(1.0, 0.0), temperature=1.0)
    assert out.tolist() == pytest.approx([sigmoid(-1.0), sigmoid(1.0)], rel=1e-12)
