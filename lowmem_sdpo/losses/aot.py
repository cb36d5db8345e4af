"""Alignment via Optimal Transport (Melnyk et al. 2024, arXiv 2406.05882), paired and unpaired.

AOT asks for first-order stochastic dominance of one distribution over another rather than a margin
per pair. In one dimension the optimal transport plan between two empirical measures of equal size
matches them rank by rank, so the relaxed dominance violation is the mean over ranks k of
cost(delta_k), delta_k = u_(k) - v_(k), with u and v each sorted ascending:

- `aot` (paired):      u = pc - pr (policy chosen-vs-rejected log-ratios), v = rc - rr (the
                        reference's): the policy's log-ratio distribution should dominate the
                        reference's.
- `aot_unpaired`:      u = pc - rc (chosen rewards / beta), v = pr - rr (rejected rewards / beta):
                        the chosen reward distribution should dominate the rejected one. Pairing
                        is not used, only the two marginals (TRL's `aot_unpaired`, formerly `aot_pair`).

Costs (z = beta * delta):
- logistic:      -(1 - ls) log sigmoid(z) - ls log sigmoid(-z)   (TRL's form, with label smoothing)
- hinge2:        max(0, beta - delta)^2                           (squared hinge, margin beta)
- lsq: (beta - delta)^2                                 (least squares toward margin beta)
The paper lists the logistic, squared hinge and least-squares surrogates of the 0-1 dominance
violation; the logistic form matches TRL exactly. For the other two, beta is the margin rather than
a scale (as in the paper's squared-hinge relaxation); the stored copies of the paper available when
this was written did not show the equations in full, so check them before relying on hinge2 /
lsq numbers matching the authors' code.

The loss of one rank depends on the whole batch through the sorts, so the losses returned are per
rank k (length B), not per example; their mean is the objective. Rewards are per example as usual.
The paper recommends beta = 0.01 and large batches (the sort only sees one micro-batch).

Sorting: "hard" is `torch.sort` (what the paper and TRL use; the gradient reaches each example
through its rank). "soft" is the NeuralSort relaxation (soft_sort.py) at `aot_temperature`, in the
units of the sorted values (nats of log-ratio). The default 0.1 is close to the hard sort for values
more than ~0.1 nats apart and smooth among near-ties, where the hard sort's rank assignment flips.
Both u and v go through the same sort so soft sorting does not bias delta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowmem_sdpo.errors import InputError
from lowmem_sdpo.losses.pairwise import LossOutput, rewards, smoothed_logistic
from lowmem_sdpo.losses.soft_sort import hard_sort, soft_sort


@dataclass(frozen=True)
class AotCost:
    formula: str
    fn: Callable[[torch.Tensor, float, float], torch.Tensor]  # (delta, beta, label_smoothing) -> loss
    smoothable: bool  # whether label_smoothing means anything for this cost


COSTS: dict[str, AotCost] = {
    "logistic": AotCost(
        "-(1-ls) log sigmoid(beta d) - ls log sigmoid(-beta d)",
        lambda delta, beta, ls: smoothed_logistic(beta * delta, ls),
        smoothable=True,
    ),
    "hinge2": AotCost(
        "max(0, beta - d)^2",
        lambda delta, beta, _ls: torch.clamp(beta - delta, min=0) ** 2,
        smoothable=False,
    ),
    "lsq": AotCost(
        "(beta - d)^2",
        lambda delta, beta, _ls: (beta - delta) ** 2,
        smoothable=False,
    ),
}

SORTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "hard": lambda values, _temperature: hard_sort(values),
    "soft": soft_sort,
}


def _sorted_cost(
    upper: torch.Tensor,
    lower: torch.Tensor,
    *,
    beta: float,
    aot_cost: str,
    aot_sort: str,
    aot_temperature: float,
    label_smoothing: float,
) -> torch.Tensor:
    """cost(sort(upper)_k - sort(lower)_k) per rank k: penalises `upper` failing to dominate `lower`."""
    cost = COSTS.get(aot_cost)
    if cost is None:
        raise InputError(f"aot_cost: expected one of {', '.join(COSTS)}, got {aot_cost!r}")
    sort = SORTS.get(aot_sort)
    if sort is None:
        raise InputError(f"aot_sort: expected one of {', '.join(SORTS)}, got {aot_sort!r}")
    if label_smoothing and not cost.smoothable:
        raise InputError(f"label_smoothing: only the logistic AOT cost takes it, not aot_cost={aot_cost!r}")
    delta = sort(upper, aot_temperature) - sort(lower, aot_temperature)
    return cost.fn(delta, beta, label_smoothing)


def aot_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    aot_cost: str = "logistic",
    aot_sort: str = "hard",
    aot_temperature: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Paired AOT: sorted policy log-ratios pc - pr should dominate sorted reference log-ratios rc - rr."""
    losses = _sorted_cost(
        policy_chosen - policy_rejected,
        ref_chosen - ref_rejected,
        beta=beta,
        aot_cost=aot_cost,
        aot_sort=aot_sort,
        aot_temperature=aot_temperature,
        label_smoothing=label_smoothing,
    )
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def aot_unpaired_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    aot_cost: str = "logistic",
    aot_sort: str = "hard",
    aot_temperature: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Unpaired AOT: sorted chosen log-ratios pc - rc should dominate sorted rejected log-ratios pr - rr.

    The two sides need not come from the same prompts, but rank-by-rank matching needs equal counts;
    the engine balances batches, so a mismatch here is an input error.
    """
    if policy_chosen.shape[0] != policy_rejected.shape[0]:
        raise InputError(
            f"aot_unpaired: chosen and rejected batches must have equal lengths, got "
            f"{policy_chosen.shape[0]} chosen and {policy_rejected.shape[0]} rejected"
        )
    losses = _sorted_cost(
        policy_chosen - ref_chosen,
        policy_rejected - ref_rejected,
        beta=beta,
        aot_cost=aot_cost,
        aot_sort=aot_sort,
        aot_temperature=aot_temperature,
        label_smoothing=label_smoothing,
    )
    return (losses, *rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))
