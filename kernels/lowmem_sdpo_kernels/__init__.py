"""lowmem_sdpo_kernels: fused lm-head projection + log-softmax + per-sequence log-prob reduction.

Needs only torch and triton. The [N, V] logits never exist: see configs.py for the memory arithmetic.

    linear_logprobs(hidden [N, D], weight [V, D], targets [N]) -> [N] float32
    sequence_logprobs(hidden [B, T, D], weight [V, D], labels [B, T]) -> (logp_sum [B], n_tokens [B])
    valid_rows(labels, V) -> rows: computed on the host, passed as rows=..., no device -> host sync

Both ops take the lm head's bias=, logit_scale= and softcap= (logit_transform.py).

impl: "auto" (triton on CUDA, torch otherwise), "triton", "torch" (chunked, bounded memory),
"naive" (full logits; tests and benchmarks only).
"""

from .configs import AUTO_FILTER_EPS, DEFAULT_TRITON_CONFIG, TORCH_CHUNKS, TorchChunks, TritonConfig
from .linear_logprobs import IMPLS, linear_logprobs, resolve_impl, valid_rows
from .sequence_logprobs import sequence_logprobs

__all__ = [
    "AUTO_FILTER_EPS",
    "DEFAULT_TRITON_CONFIG",
    "IMPLS",
    "TORCH_CHUNKS",
    "TorchChunks",
    "TritonConfig",
    "linear_logprobs",
    "resolve_impl",
    "sequence_logprobs",
    "valid_rows",
]
