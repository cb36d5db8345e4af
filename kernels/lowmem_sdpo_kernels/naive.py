"""Reference implementation: materialises the full [N, V] logits. Tests and benchmarks only.

It is the readable statement of what the fused kernels compute:
    z = softcap(scale * (hidden @ weight.T + bias)),  logp[n] = log_softmax(z)[n, targets[n]]
(no bias, scale 1 and no softcap unless given; see logit_transform.py). Logits and the head
transform are computed in the input dtype (what a plain model forward does), then log-softmax runs
in fp32 (fp64 stays fp64), so run it in float64 to get a ground truth.
"""

from __future__ import annotations

import torch

from .configs import OpOptions


def naive_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: OpOptions | None = None,
) -> torch.Tensor:
    """hidden [M, D], weight [V, D], bias [V] or None, targets [M] all valid (in [0, V)) -> [M] log-probs.

    Of options only the head transform applies; filter_eps and triton_config are accepted for a
    uniform signature and ignored: the naive reference has no tiles to skip or tune.
    """
    logits = hidden @ weight.T  # [M, V]: the tensor the fused implementations never build
    if bias is not None:
        logits = logits + bias
    if options is not None:
        logits = options.transform.apply(logits)
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc_dtype), dim=-1)
    out = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    return out if acc_dtype == torch.float64 else out.float()
