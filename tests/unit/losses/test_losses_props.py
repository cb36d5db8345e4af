"""Invariants of the loss family, the soft sort's limit and safety, input errors, the registry and flags."""

import argparse
import math

import pytest
import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.losses import LOSSES, add_loss_arguments, get_loss, loss_options_from_args, preference_loss
from lowmem_sdpo.losses.soft_sort import hard_sort, soft_sort, soft_sort_matrix


def randn(n: int, seed: int, dtype=torch.float64, scale: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, generator=g, dtype=torch.float64) - 50).to(dtype)


@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
@pytest.mark.parametrize("name", ["sigmoid", "dpop", "aot", "aot_unpaired"])
def test_logistic_losses_equal_ln2_when_policy_is_the_reference(name, beta):
    chosen, rejected = randn(8, 1), randn(8, 2)
    losses, chosen_rewards, _ = preference_loss(
        name, chosen, rejected, chosen.clone(), rejected.clone(), beta=beta
    )
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-12)
    assert torch.all(chosen_rewards == 0)


def test_dpo_loss_decreases_as_the_margin_grows():
    pc = torch.linspace(-12, -8, 9, dtype=torch.float64)
    losses, _, _ = preference_loss(
        "sigmoid", pc, torch.full_like(pc, -10), torch.full_like(pc, -10), torch.full_like(pc, -10), beta=0.5
    )
    assert torch.all(losses[1:] < losses[:-1])


def test_aot_is_invariant_to_batch_order_and_pairwise_losses_are_equivariant():
    inputs = [randn(7, s) for s in range(4)]
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    permuted = [x[perm] for x in inputs]
    for name in ("aot", "aot_unpaired"):
        for sort in ("hard", "soft"):
            a = preference_loss(name, *inputs, beta=0.1, aot_sort=sort)[0]
            b = preference_loss(name, *permuted, beta=0.1, aot_sort=sort)[0]
            assert torch.allclose(a, b, rtol=0, atol=1e-12), (name, sort)
    a = preference_loss("sigmoid", *inputs, beta=0.1)[0]
    b = preference_loss("sigmoid", *permuted, beta=0.1)[0]
    assert torch.equal(a[perm], b)


def test_aot_unpaired_permuting_one_side_alone_changes_nothing():
    # Unpaired: only the two marginals matter, so breaking the pairing leaves the loss as it was.
    pc, pr, rc, rr = (randn(6, s) for s in range(4))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = preference_loss("aot_unpaired", pc, pr, rc, rr, beta=0.1)[0]
    b = preference_loss("aot_unpaired", pc, pr[perm], rc, rr[perm], beta=0.1)[0]
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # ... whereas the paired AOT compares per-pair log-ratios, which the shuffle changes.
    c = preference_loss("aot", pc, pr, rc, rr, beta=0.1)[0]
    d = preference_loss("aot", pc, pr[perm], rc, rr[perm], beta=0.1)[0]
    assert not torch.allclose(c, d)


def min_gap(values: torch.Tensor) -> float:
    return torch.sort(values).values.diff().min().item()


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("cost", ["logistic", "hinge2", "lsq"])
def test_soft_aot_tends_to_hard_aot_values_and_gradients(name, cost):
    base = [randn(6, s + 8) for s in range(4)]  # seeds whose sorted sides are >= 0.25 apart
    pc, pr, rc, rr = base
    # The hard sort is locally linear only away from ties of the quantities AOT sorts.
    sorted_sides = (pc - pr, rc - rr) if name == "aot" else (pc - rc, pr - rr)
    assert min(min_gap(x) for x in sorted_sides) > 0.05

    def run(sort: str, temperature: float):
        inputs = [x.clone().requires_grad_() for x in base]
        losses = preference_loss(
            name, *inputs, beta=0.1, aot_cost=cost, aot_sort=sort, aot_temperature=temperature
        )[0]
        losses.mean().backward()
        return losses.detach(), [x.grad for x in inputs]

    hard_losses, hard_grads = run("hard", 1.0)
    errors = []
    for temperature in (1.0, 0.1, 1e-3):
        losses, grads = run("soft", temperature)
        errors.append(
            max(
                (losses - hard_losses).abs().max().item(),
                *((g - h).abs().max().item() for g, h in zip(grads, hard_grads, strict=True)),
            )
        )
    assert errors[-1] < 1e-9, errors
    assert errors[0] > errors[-1]  # a real relaxation at temperature 1, not the hard sort in disguise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1e-36, 1e-6, 1e-2, 1.0, 1e4])
def test_soft_sort_is_numerically_safe(dtype, temperature):
    # Long-answer log-probs (thousands of nats), near-ties and an exact tie.
    values = torch.tensor([-5000.0, -4999.99, -120.5, -120.5, -3.0, -7000.0], dtype=dtype, requires_grad=True)
    out = soft_sort(values, temperature)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(values.grad).all()
    # Each output is a convex combination of the inputs (up to rounding of thousands in float32).
    slack = 1e-3 if dtype == torch.float32 else 1e-9
    assert out.min() >= values.min() - slack and out.max() <= values.max() + slack
    assert torch.allclose(soft_sort_matrix(values, temperature).sum(-1), torch.ones(6, dtype=dtype))
    if temperature <= 1e-6:  # far below the smallest gap (0.01): the hard sort (float32 ulp at 5000 ~ 5e-4)
        assert torch.allclose(out, hard_sort(values), rtol=0, atol=1e-3 if dtype == torch.float32 else 1e-9)


def test_soft_sort_tends_to_the_mean_at_huge_temperature():
    values = randn(5, 4)
    assert torch.allclose(soft_sort(values, 1e9), values.mean().expand(5), rtol=0, atol=1e-4)


def test_soft_sort_is_ascending_and_permutation_invariant():
    values = randn(9, 3)
    out = soft_sort(values, 0.5)
    assert torch.all(out[1:] >= out[:-1])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(soft_sort(values[perm], 0.5), out, rtol=0, atol=1e-12)
    assert soft_sort(values[:1], 0.5).tolist() == values[:1].tolist()


# --- input errors ----------------------------------------------------------------------------------

ONE = torch.tensor([-1.0])


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: preference_loss("dpo2", ONE, ONE, ONE, ONE, beta=0.1), ["dpo2", "sigmoid", "kto"]),
        (
            lambda: preference_loss("sigmoid", ONE, ONE, ONE, ONE, beta=0.1, aot_cost="logistic"),
            ["aot_cost", "label_smoothing"],
        ),
        (
            lambda: preference_loss("hinge", ONE, ONE, ONE, ONE, beta=0.1, label_smoothing=0.1),
            ["label_smoothing", "no options"],
        ),
        (lambda: preference_loss("ipo", ONE, ONE, ONE, ONE, beta=0.1), ["chosen_tokens"]),
        (
            lambda: preference_loss("ipo", ONE, ONE, ONE, ONE, beta=0.1, chosen_tokens=torch.tensor([3])),
            ["rejected_tokens"],
        ),
        (
            lambda: preference_loss(
                "ipo",
                ONE,
                ONE,
                ONE,
                ONE,
                beta=0.1,
                chosen_tokens=torch.tensor([0]),
                rejected_tokens=torch.tensor([2]),
            ),
            ["chosen_tokens", "positive"],
        ),
        (
            lambda: preference_loss(
                "aot_unpaired", torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(2), beta=0.1
            ),
            ["equal lengths", "3", "2"],
        ),
        (
            lambda: preference_loss(
                "sigmoid", torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(2), beta=0.1
            ),
            ["paired", "3", "2"],
        ),
        (
            lambda: preference_loss(
                "sigmoid", torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3), beta=0.1
            ),
            ["ref_chosen"],
        ),
        (
            lambda: preference_loss(
                "sigmoid", torch.zeros(3, 1), torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1
            ),
            ["policy_chosen", "1-D"],
        ),
        (lambda: preference_loss("sigmoid", ONE, ONE, ONE, ONE, beta=0.0), ["beta"]),
        (
            lambda: preference_loss("sigmoid", ONE, ONE, ONE, ONE, beta=0.1, label_smoothing=0.7),
            ["label_smoothing", "[0, 0.5)"],
        ),
        (
            lambda: preference_loss("aot", ONE, ONE, ONE, ONE, beta=0.1, aot_cost="cubic"),
            ["aot_cost", "hinge2"],
        ),
        (
            lambda: preference_loss(
                "aot", ONE, ONE, ONE, ONE, beta=0.1, aot_sort="soft", aot_temperature=0.0
            ),
            ["aot_temperature", "> 0"],
        ),
        (
            lambda: preference_loss(
                "aot", ONE, ONE, ONE, ONE, beta=0.1, aot_cost="hinge2", label_smoothing=0.1
            ),
            ["label_smoothing", "logistic"],
        ),
        (
            lambda: preference_loss("kto", ONE, ONE, ONE, ONE, beta=0.1, policy_kl=ONE),
            ["policy_kl", "ref_kl"],
        ),
        (
            lambda: preference_loss("kto", ONE, ONE, ONE, ONE, beta=0.1, desirable_weight=-1.0),
            ["desirable_weight", ">= 0"],
        ),
        (
            lambda: preference_loss("dpop", ONE, ONE, ONE, ONE, beta=0.1, dpop_lambda="big"),
            ["dpop_lambda", "float"],
        ),
        (lambda: get_loss("orpo"), ["orpo", "aot_unpaired"]),
    ],
)
def test_input_errors_name_what_was_wrong(call, words):
    with pytest.raises(InputError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


# --- registry and flags ----------------------------------------------------------------------------


def test_every_registry_entry_is_documented():
    for name, spec in LOSSES.items():
        assert spec.name == name
        assert spec.formula.strip() and "\n" not in spec.formula
        assert "20" in spec.paper and "et al." in spec.paper  # a year and authors
        assert callable(spec.fn)
        for option in spec.options.values():
            assert option.help.strip()
    assert {n for n, s in LOSSES.items() if not s.paired_only} == {"aot_unpaired", "kto"}
    assert {n for n, s in LOSSES.items() if s.batch_coupled} == {"aot", "aot_unpaired"}
    assert [n for n, s in LOSSES.items() if s.needs_tokens] == ["ipo"]
    assert [n for n, s in LOSSES.items() if s.needs_kl] == ["kto"]


def test_defaults_come_from_the_spec():
    # sigmoid with no options == sigmoid with its declared default, element for element.
    inputs = [randn(4, s) for s in range(4)]
    a = preference_loss("sigmoid", *inputs, beta=0.1)[0]
    b = preference_loss(
        "sigmoid", *inputs, beta=0.1, label_smoothing=LOSSES["sigmoid"].options["label_smoothing"].default
    )[0]
    assert torch.equal(a, b)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    return parser.parse_args(argv)


def test_loss_flags_fill_defaults_and_keep_given_values():
    args = parse(["--loss", "aot", "--aot-sort", "soft", "--aot-temperature", "0.5"])
    assert args.loss == "aot"
    assert loss_options_from_args(args.loss, args) == {
        "aot_cost": "logistic",
        "aot_sort": "soft",
        "aot_temperature": 0.5,
        "label_smoothing": 0.0,
    }
    args = parse([])
    assert args.loss == "sigmoid" and loss_options_from_args("sigmoid", args) == {"label_smoothing": 0.0}
    # KTO's tensor options are inputs the engine passes, never flags.
    assert loss_options_from_args("kto", parse(["--desirable-weight", "1.33"])) == {
        "desirable_weight": 1.33,
        "undesirable_weight": 1.0,
    }
    assert loss_options_from_args("ipo", parse([])) == {}


def test_a_flag_the_loss_does_not_take_is_an_error():
    with pytest.raises(InputError) as err:
        loss_options_from_args("sigmoid", parse(["--dpop-lambda", "10"]))
    assert "--dpop-lambda" in str(err.value) and "sigmoid" in str(err.value)
    with pytest.raises(InputError, match="--label-smoothing"):
        loss_options_from_args("kto", parse(["--label-smoothing", "0.1"]))


def test_flag_values_are_validated_and_choices_enforced():
    with pytest.raises(InputError, match="aot_temperature"):
        loss_options_from_args("aot", parse(["--aot-temperature", "-1"]))
    with pytest.raises(SystemExit):
        parse(["--aot-cost", "cubic"])
    with pytest.raises(SystemExit):
        parse(["--loss", "orpo"])


def test_the_torch_free_registry_names_the_aot_costs_and_sorts_aot_defines():
    from lowmem_sdpo.losses.aot import COSTS, SORTS
    from lowmem_sdpo.losses.specs import AOT_COSTS, AOT_SORTS

    assert AOT_COSTS == tuple(COSTS)
    assert AOT_SORTS == tuple(SORTS)
