"""Activation memory of one forward / backward, per part, for a Llama-style block (attention with q/k/v/o
through SDPA, a gated MLP, RMSNorm) with LoRA (dropout > 0) on every block linear. Estimates, not exact:
they follow what autograd keeps for each op of transformers' Llama code as the engine runs it (bf16 autocast,
non-reentrant checkpointing of every decoder layer, peft LoRA on bitsandbytes Linear4bit); the GPU pass
compares them with measured peaks.

Notation: N = rows x length tokens of one forward (every row padded to --max-length: the worst micro-batch),
H hidden, Q = heads x head_dim, K = kv heads x head_dim, I intermediate, c bytes per compute-dtype element
(2 for bf16), r the LoRA rank. SOLAR-10.7B, one pair (2 rows) at 2048 tokens: N = 4096.

Training keeps, per decoder layer, only its input (checkpointing): N·H·c = 32 MiB, x 48 layers = 1.5 GiB.
Backward recomputes one layer at a time and keeps, until that layer's backward is done:
  * each RMSNorm's fp32 copy of its input (pow and mul save it): 2 x N·H·4;
  * per LoRA'd linear of input width w: the dropout output (lora_A's input) N·w·c and dropout's bool mask
    N·w (torch's CPU dropout: N·w·c), lora_A's output N·r·c (lora_B's input) and autocast's copies of the
    factors; the 4-bit base matmul keeps no input (its backward needs only the weight, which bitsandbytes
    dequantises again);
  * SDPA's q, repeated k and v (transformers repeats GQA heads whenever there is a padding mask) and output,
    4 x N·Q·c, its fp32 log-sum-exp N·heads·4, and the mask as an additive compute-dtype copy rows·L²·c;
  * the MLP's gate output (SiLU's input), SiLU output and up output (the product's inputs): 3 x N·I·c.
For SOLAR at N = 4096 that is about 1.0 GiB, with the gradient flowing through the layer (2 x N·H·c) and the
dequantised weight (I·H·c = 112 MiB). The MLP's gradient buffers (N·I·c each) appear only after the saved
tensors they replace are freed: they do not add to the peak (measured on CPU, layer_backward_transient).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_sdpo.plan.shapes import FP32, ModelShapes
from lowmem_sdpo_kernels.configs import DEFAULT_TRITON_CONFIG, MAX_VOCAB_SPLITS, TORCH_CHUNKS
from lowmem_sdpo_kernels.linear_logprobs import ROW_INDEXED

BOOL = 1
# The engine's CPU path (fp32, no autocast) keeps two things differently from CUDA under autocast:
#   * with --lora-dropout-impl torch, dropout keeps its mask as a tensor of the input's dtype (torch's CPU dropout
#     multiplies by a noise tensor); CUDA's fused dropout and the lane dropout (models/lora_dropout.py, a
#     masked_fill_) keep a bool mask;
#   * there is no autocast, so no compute-dtype copies of the fp32 LoRA factors.
DEVICES = ("cuda", "cpu")
# --lora-dropout-impl (models/lora_dropout.DROPOUT_IMPLS; literal here, so the plan imports no model code)
DROPOUT_IMPLS = ("lanes", "torch")


@dataclass(frozen=True)
class Batch:
    """One forward: `rows` sequences (a pair is two: chosen and rejected) of `length` tokens."""

    rows: int
    length: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def checkpoints(s: ModelShapes, b: Batch) -> int:
    """Every decoder layer's input, kept for the recompute: n_layers x N·H·c."""
    return s.n_layers * b.tokens * s.hidden * s.element_size


def mask_and_rotary(s: ModelShapes, b: Batch) -> int:
    """The 4D bool padding mask [rows, 1, L, L], built once per forward and shared by every layer, and the
    rotary cos / sin tables [rows, L, head_dim] in the compute dtype."""
    return b.rows * b.length * b.length * BOOL + 2 * b.rows * b.length * s.head_dim * s.element_size


def sdpa_mask_copy(s: ModelShapes, b: Batch) -> int:
    """SDPA turns the bool mask into an additive one of the query's dtype per call (and keeps it for backward)."""
    return b.rows * b.length * b.length * s.element_size


def dropout_mask_bytes(s: ModelShapes, device: str, dropout_impl: str) -> int:
    """Bytes per element of the mask LoRA dropout keeps for backward: torch's CPU dropout keeps its noise tensor
    in the input's dtype; CUDA's fused dropout and the lane dropout a bool mask."""
    return s.element_size if (device, dropout_impl) == ("cpu", "torch") else BOOL


def lora_saved(s: ModelShapes, b: Batch, r: int, device: str = "cuda", dropout_impl: str = "lanes") -> int:
    """Per LoRA'd linear of one layer: its dropout output (lora_A's input, c per element) and dropout mask
    (dropout_mask_bytes), lora_A's output (lora_B's input, N·r·c), and autocast's copies of the fp32 factors."""
    c = s.element_size
    mask_bytes = dropout_mask_bytes(s, device, dropout_impl)
    inputs = sum(b.tokens * (lin.in_features * (c + mask_bytes) + r * c) for lin in s.layer_linears())
    return inputs + (0 if device == "cpu" else lora_factor_copies(s, r))


def lora_factor_copies(s: ModelShapes, r: int) -> int:
    """Autocast casts each fp32 LoRA factor to the compute dtype for its matmul, which keeps the copy for
    backward: r·(in + out)·c per linear of the layer."""
    return sum(r * (lin.in_features + lin.out_features) * s.element_size for lin in s.layer_linears())


def layer_saved(s: ModelShapes, b: Batch, r: int, device: str = "cuda", dropout_impl: str = "lanes") -> int:
    """What one decoder layer keeps for its backward (see the module docstring)."""
    c, n = s.element_size, b.tokens
    q_width = s.n_heads * s.head_dim
    norms = 2 * n * (s.hidden * FP32 + FP32)  # fp32 input copy and the rsqrt per row
    attention = 4 * n * q_width * c + n * s.n_heads * FP32 + sdpa_mask_copy(s, b)
    mlp = 3 * n * s.intermediate * c
    return norms + attention + mlp + lora_saved(s, b, r, device, dropout_impl)


def layer_backward_transient(s: ModelShapes, b: Batch) -> int:
    """Gradient buffers alive when a layer's peak is reached: the gradient flowing in and out of the layer
    (2 x N·H·c). Non-reentrant checkpointing recomputes the layer at its backward's first unpack, so every saved
    tensor is alive with only these; the MLP's gradient buffers (N·I each) come later, each after the saved
    tensors it replaces have been unpacked and freed, and the live bytes only fall from there (measured on a CPU
    step: tests/unit/plan/test_plan_real_tensors.py, benchmarks/results/profile_train_memory_smollm2.json)."""
    return 2 * b.tokens * s.hidden * s.element_size


def layer_forward_transient(s: ModelShapes, b: Batch) -> int:
    """Peak of one layer's forward without autograd (reference pass, drift sample; also a checkpointed
    training forward, whose layer internals are dropped): the larger of the attention moment (norm output,
    q, post-rope k and v, repeated k and v, SDPA output, the additive mask) and the MLP moment (norm output,
    SiLU(gate), up and their product)."""
    c, n = s.element_size, b.tokens
    q_width, kv_width = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    attention = n * s.hidden * c + n * (4 * q_width + 2 * kv_width) * c + sdpa_mask_copy(s, b)
    mlp = n * s.hidden * c + 3 * n * s.intermediate * c
    return max(attention, mlp)


def residual_stream(s: ModelShapes, b: Batch) -> int:
    """The running hidden state and the residual beside it during a forward: 2 x N·H·c."""
    return 2 * b.tokens * s.hidden * s.element_size


def dequant_buffer(s: ModelShapes) -> int:
    """bitsandbytes dequantises a 4-bit weight to a dense compute-dtype copy for each matmul (forward, and
    again for the input gradient): the largest block weight's, e.g. SOLAR's 14336 x 4096 x 2 B = 112 MiB."""
    return s.largest_linear() * s.element_size


def vocab_splits(vocab: int) -> int:
    """The Triton forward's vocabulary splits (lowmem_sdpo_kernels.triton_forward._vocab_splits)."""
    block_v = DEFAULT_TRITON_CONFIG.block_v
    tiles = -(-vocab // block_v)
    per_split = -(-tiles // min(MAX_VOCAB_SPLITS, max(tiles, 1)))
    return -(-tiles // per_split)


# The log-prob implementations the plan accounts for: "triton" is what `run --logprob-impl auto` picks on a card
# the Triton path runs on; "torch" is the chunked impl (--deterministic, or a card Triton cannot run on).
KERNEL_IMPLS = ("triton", "torch")


def _labelled(b: Batch, labelled: int | None) -> int:
    """M, the tokens with a target: `labelled`, or the plan's worst case, every token (N)."""
    return b.tokens if labelled is None else labelled


def row_compaction(s: ModelShapes, b: Batch, impl: str, labelled: int | None = None) -> int:
    """The forward's copy of the labelled rows of hidden. The torch impl compacts them with index_select
    (M·H·c; none when nothing is ignored, M = N, which the worst case counts as all N all the same: M = N - 1
    copies almost as much). The Triton kernels read them in place through `rows=` (the engine always passes
    it): no copy."""
    if impl in ROW_INDEXED:
        return 0
    m = _labelled(b, labelled)
    return m * s.hidden * s.element_size if labelled is None or m < b.tokens else 0


def gradient_scatter(s: ModelShapes, b: Batch, impl: str, labelled: int | None = None) -> int:
    """index_select's backward, after the torch impl: a zero [N, D] in the compute dtype that the compacted
    rows' gradient is added into (out of place, so beside the [N, D] result that is hidden's gradient). The
    Triton kernels write dH at the rows' own places in an [N, D] buffer: no scatter."""
    if impl in ROW_INDEXED:
        return 0
    m = _labelled(b, labelled)
    return b.tokens * s.hidden * s.element_size if labelled is None or m < b.tokens else 0


def _torch_chunk(s: ModelShapes, b: Batch) -> tuple[int, int]:
    """(rows, vocabulary entries) of the torch impl's chunk (configs.TORCH_CHUNKS), cut to the data."""
    return min(TORCH_CHUNKS.rows, b.tokens), min(TORCH_CHUNKS.vocab, s.vocab)


def kernel_forward(s: ModelShapes, b: Batch, impl: str = "triton") -> int:
    """The fused log-prob op's forward (configs.py), M labelled rows counted as all N, and [N] fp32 outputs
    (the M log-probs placed into a zero [N]). Triton: per-row partial (max, sum, target) per vocabulary split
    in fp32, then each row's mass per split (kept for the backward's filter) and the log-sum-exp. torch: the
    compaction copy (row_compaction), one [rows, vocab] fp32 logits chunk, the log-sum-exp and log-probs.
    No [N, V] tensor."""
    m = b.tokens
    outputs = 2 * b.tokens * FP32
    if impl in ROW_INDEXED:
        return 4 * vocab_splits(s.vocab) * m * FP32 + m * FP32 + outputs
    rows, cols = _torch_chunk(s, b)
    return row_compaction(s, b, impl) + rows * cols * FP32 + 2 * m * FP32 + outputs


def kernel_kept(s: ModelShapes, b: Batch, impl: str = "triton") -> int:
    """What the op's forward leaves alive for its backward: kernel_forward without the torch impl's [rows, vocab]
    logits chunk, a workspace freed chunk by chunk (the Triton figures are kept whole: its per-split partials
    feed the backward's filter)."""
    if impl in ROW_INDEXED:
        return kernel_forward(s, b, impl)
    rows, cols = _torch_chunk(s, b)
    return kernel_forward(s, b, impl) - rows * cols * FP32


def kernel_backward(s: ModelShapes, b: Batch, impl: str = "triton") -> int:
    """Its backward; the frozen lm head gets no dW. Triton: fp32 dH [N, D] filled by atomics at the labelled
    rows, and its cast to the compute dtype. torch: the gradient of the M rows in the compute dtype, finished
    one row chunk at a time in an fp32 accumulator, and the chunk's softmax in fp32; in a half compute dtype
    also the fp32 product added into the accumulator, the accumulator's cast and dz rounded to that dtype (in
    fp32 those are in place or the tensors themselves); then index_select's scatter (gradient_scatter)."""
    c, m = s.element_size, b.tokens
    if impl in ROW_INDEXED:
        return m * s.hidden * (FP32 + c)
    rows, cols = _torch_chunk(s, b)
    half = c != FP32
    chunk = rows * s.hidden * (FP32 + (FP32 + c) * half) + rows * cols * (FP32 + c * half)
    return m * s.hidden * c + chunk + gradient_scatter(s, b, impl)


def final_norm_saved(s: ModelShapes, b: Batch) -> int:
    """The final RMSNorm runs outside the checkpointed layers: its fp32 input copy lives until its backward."""
    return b.tokens * (s.hidden * FP32 + FP32)
