"""A differentiable ascending sort of a 1-D tensor: the NeuralSort relaxation.

Grover, Wang, Zweig & Ermon (2019), "Stochastic Optimization of Sorting Networks via Continuous
Relaxations", ICLR. For s in R^n let B_j = sum_k |s_j - s_k|. Row i (1-based) of the relaxed
permutation matrix is

    P[i, :] = softmax(((2i - n - 1) * s - B) / temperature)

and P @ s is the soft ascending sort. (The paper's rows use (n + 1 - 2i) and sort descending; sorting
-s descending is sorting s ascending, and B does not change when s is negated.) Each row is a
probability vector, so every soft-sorted value is a convex combination of the inputs; as
temperature -> 0 each row tends to the one-hot row of the hard sort (for distinct values), so
values and gradients tend to those of `torch.sort`.

Why NeuralSort rather than a Sinkhorn (entropic OT) sort: it is closed form (no iteration count to
tune, no convergence failure at small temperature), exact in the limit, and costs O(n^2) for the
micro-batch sizes this project sorts (n <= a few hundred).
"""

from __future__ import annotations

import torch


def soft_sort_matrix(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """The relaxed ascending permutation matrix [n, n] of a 1-D tensor (rows sum to 1)."""
    if values.dim() != 1:
        raise ValueError(f"soft_sort expects a 1-D tensor, got shape {tuple(values.shape)}")
    if not temperature > 0:
        raise ValueError(f"soft_sort temperature must be > 0, got {temperature}")
    n = values.shape[0]
    # Each row's logits shift by a row constant when s shifts, so centring changes nothing
    # mathematically; it keeps (2i - n - 1) * s small next to its differences in float32.
    s = values - values.detach().mean()
    spread = (s.unsqueeze(0) - s.unsqueeze(1)).abs().sum(dim=0)  # B_j
    rank = torch.arange(1, n + 1, dtype=s.dtype, device=s.device)
    scale = (2 * rank - n - 1).unsqueeze(1)  # [n, 1]
    raw = scale * s.unsqueeze(0) - spread.unsqueeze(0)
    # Subtract each row's max before dividing: the largest logit is then 0 and the others go to
    # -inf (weight 0) rather than overflowing to +inf (NaN) when the temperature is tiny.
    logits = (raw - raw.detach().amax(dim=-1, keepdim=True)) / temperature
    return torch.softmax(logits, dim=-1)


def soft_sort(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft ascending sort of a 1-D tensor; tends to `torch.sort(values).values` as temperature -> 0."""
    if values.numel() <= 1:
        return values.clone()
    return soft_sort_matrix(values, temperature) @ values


def hard_sort(values: torch.Tensor) -> torch.Tensor:
    """Ascending sort; the gradient flows to each value through its rank (piecewise linear)."""
    return torch.sort(values, dim=0).values
