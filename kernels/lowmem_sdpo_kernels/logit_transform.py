"""What some lm heads do to the logits after the matmul: a bias, a scale and a final tanh softcap.

    z = softcap(scale * (h @ W^T + b)),   softcap(y) = c * tanh(y / c)   (identity when c is None)

Phi has the bias, Cohere multiplies by config.logit_scale, Granite divides by config.logits_scaling
(scale = 1 / logits_scaling), Gemma 2/3 cap with config.final_logit_softcapping. The log-prob is
still log_softmax(z)[target], so everything downstream of z (online log-sum-exp, softmax p, the
gradient filter's mass bound on p) is unchanged. Only the chain rule gains two factors:

    d z / d y = 1 - tanh(y / c)^2 = 1 - (z / c)^2        d y / d x = scale

Both are at most |scale| in magnitude, which is what the filter's error bound picks up (configs.py).
The bias is a tensor argument of every implementation (it can require grad); the two numbers live
here, in one frozen value handed down with the other per-call options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """The non-tensor part of the head: scale and softcap. The default is the identity, and every
    implementation then runs exactly the operations it ran before these existed (bit-identical)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def has_scale(self) -> bool:
        return self.scale != 1.0

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The readable definition, in y's dtype (naive reference; also what transformers does)."""
        if self.has_scale:
            y = y * self.scale
        if self.softcap is not None:
            y = self.softcap * torch.tanh(y / self.softcap)
        return y


def resolve_transform(logit_scale: float, softcap: float | None) -> LogitTransform:
    """Validate the public keywords (ValueError naming the bad one) and build the transform."""
    scale = float(logit_scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"logit_scale must be a finite non-zero float, got {logit_scale!r}")
    if softcap is None:
        return LogitTransform(scale, None)
    cap = float(softcap)
    if not (math.isfinite(cap) and cap > 0.0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    return LogitTransform(scale, cap)


def check_bias(bias: torch.Tensor | None, weight: torch.Tensor) -> None:
    """bias [V] must match the weight's vocabulary, dtype and device (ValueError otherwise)."""
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(
            f"bias must share the weight's dtype and device ({weight.dtype}, {weight.device}), "
            f"got {bias.dtype}, {bias.device}"
        )
