"""Chunked plain-torch implementation: bounded memory, any device, any float dtype.

Three tiers like the Triton path: chunk loops (_forward / _backward) -> one autograd.Function ->
torch_linear_logprobs, which the public linear_logprobs dispatches to.

Memory arithmetic: with R = TORCH_CHUNKS.rows and C = TORCH_CHUNKS.vocab, the forward holds one
[R, C] fp32 logits chunk (exponentiated in place), the fp32 copies of one [R, D] hidden chunk and one [C, D]
weight chunk, and O(M) per-row state (running max, running sum of exp, target logit). The
log-sum-exp [M] is the only thing saved for backward besides the inputs; the backward recomputes
each logits chunk from the same slices with the same fp32 operations, so the values match the
forward exactly. With a softcap the backward keeps a second [R, C] fp32 chunk, tanh(y / c), for
the derivative 1 - tanh^2 (32 MiB at the default 2048 x 4096). Nothing has an M x V shape unless
M <= R and V <= C, where it is the bounded chunk.

On CUDA (issue 13): bf16/fp16 inputs are multiplied in their own dtype into fp32 outputs (torch.mm's
out_dtype: fp32 accumulation, as the Triton kernel does), so no fp32 copies of hidden and weight chunks
are made and the tensor cores run; fp32 inputs follow torch's own TF32 setting
(torch.backends.cuda.matmul), i.e. TF32 where the caller allowed it. The backward's gradient filter
needs the host to read a chunk's mass, a device -> host sync per chunk; on CUDA the chunks are
therefore never skipped (the exact gradient satisfies every filter bound) and nothing syncs.
"""

from __future__ import annotations

import torch

from .configs import TORCH_CHUNKS, OpOptions, TorchChunks
from .logit_transform import LogitTransform


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for every input dtype; fp64 inputs (reference runs) keep fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _half_on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def _operand(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A chunk as a matmul operand: half-precision CUDA chunks stay as they are (_mm multiplies them
    into fp32); everything else is upcast to the accumulation dtype."""
    return t if _half_on_cuda(t) else t.to(acc)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (fp64 for fp64): half-precision CUDA operands through torch.mm's out_dtype."""
    if _half_on_cuda(a) and _half_on_cuda(b):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b: in place (addmm_) off the half-precision CUDA path, whose fp32-output product
    needs one temporary of out's shape."""
    if _half_on_cuda(a) and _half_on_cuda(b):
        out += torch.mm(a, b, out_dtype=torch.float32)
    else:
        out.addmm_(a, b)


def _chunk_logits(
    h_acc: torch.Tensor,
    w_acc: torch.Tensor,
    b_acc: torch.Tensor | None,
    transform: LogitTransform,
    keep_tanh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[R, D] x [C, D] (+ [C]) -> ([R, C] logits z, tanh(y / c) if keep_tanh and softcapped, else
    None), in the accumulation dtype. Forward and backward both call this on identical slices with
    the same elementwise operations (in place or not gives the same values), which is what makes
    the recomputation exact. Each transform runs only when present, so the identity head performs
    exactly the single matmul it always did."""
    z = _mm(h_acc, w_acc.T)
    if b_acc is not None:
        z.add_(b_acc)
    if transform.has_scale:
        z.mul_(transform.scale)
    if transform.softcap is None:
        return z, None
    t = z.div_(transform.softcap).tanh_()  # z's buffer now holds tanh(y / c)
    if not keep_tanh:  # forward: one [R, C] buffer
        return t.mul_(transform.softcap), None
    return t * transform.softcap, t


def _target_in_chunk(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    inside = (targets >= v0) & (targets < v1)
    local = (targets - v0).clamp(0, v1 - v0 - 1)
    return inside, local


def _slice(t: torch.Tensor | None, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t[lo:hi].to(dtype)


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: LogitTransform,
    chunks: TorchChunks,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logp [M], lse [M]) in the accumulation dtype, via online log-sum-exp over chunks."""
    m_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    rows, cols = chunks.rows, chunks.vocab
    lse = torch.empty(m_rows, dtype=acc, device=hidden.device)
    logp = torch.empty(m_rows, dtype=acc, device=hidden.device)
    for r0 in range(0, m_rows, rows):
        r1 = min(r0 + rows, m_rows)
        h_acc = _operand(hidden[r0:r1], acc)
        t = targets[r0:r1]
        run_max = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=hidden.device)
        run_sum = torch.zeros(r1 - r0, dtype=acc, device=hidden.device)
        tgt = torch.zeros(r1 - r0, dtype=acc, device=hidden.device)
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            z, _ = _chunk_logits(h_acc, _operand(weight[v0:v1], acc), _slice(bias, v0, v1, acc), transform)
            inside, local = _target_in_chunk(t, v0, v1)
            tgt = tgt + torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            # exp(-inf - finite) = 0 on the first chunk, so no special case is needed. In place:
            # the chunk's logits buffer becomes its exp, so one [R, C] buffer is the workspace.
            run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
            # Drop the name now: otherwise this chunk stays alive while the next one is computed (two [R, C]
            # buffers at the peak instead of one).
            del z
        lse[r0:r1] = run_max + torch.log(run_sum)
        logp[r0:r1] = tgt - lse[r0:r1]
    return logp, lse


def _backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    needs: tuple[bool, bool, bool],
    options: OpOptions,
    chunks: TorchChunks,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """d logp[n] / d z[n, v] = 1[v == t_n] - softmax(z)[n, v]; chain through the head transform
    (factors scale and 1 - tanh^2, see logit_transform.py) and x = h W^T + b.

    needs = (hidden, weight, bias) gradients wanted. grad_hidden rows are finished one row chunk at
    a time in an fp32 [R, D] accumulator. grad_weight, when needed, accumulates across row chunks in
    an fp32 [V, D] buffer (never in bf16) and is cast to the weight dtype once at the end; likewise
    grad_bias in an fp32 [V]. With a frozen weight nothing of size V x D is allocated.
    """
    need_hidden, need_weight, need_bias = needs
    transform, filter_eps = options.transform, options.filter_eps
    m_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    rows, cols = chunks.rows, chunks.vocab
    n_chunks = -(-vocab // cols)
    # The mass bound gives each chunk 1 / n_chunks of a row's budget; the element rule compares each p.
    # On CUDA no chunk is skipped: the test would be a host sync per chunk (module docstring).
    skip_test = None if filter_eps is None or hidden.is_cuda else _SKIP_TESTS[options.filter_mode]
    threshold = None if filter_eps is None else filter_eps / n_chunks if options.filter_mode == "bound" else filter_eps
    grad_h = torch.empty_like(hidden) if need_hidden else None
    grad_w_acc = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_b_acc = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    g_all = grad_out.to(acc)
    for r0 in range(0, m_rows, rows):
        r1 = min(r0 + rows, m_rows)
        h_acc = _operand(hidden[r0:r1], acc)
        t, g, lse_r = targets[r0:r1], g_all[r0:r1], lse[r0:r1]
        dh_acc = torch.zeros(h_acc.shape, dtype=acc, device=hidden.device) if need_hidden else None
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            w_acc = _operand(weight[v0:v1], acc)
            z, tanh = _chunk_logits(h_acc, w_acc, _slice(bias, v0, v1, acc), transform, keep_tanh=True)
            p = z.sub_(lse_r[:, None]).exp_()  # softmax chunk, in place
            inside, local = _target_in_chunk(t, v0, v1)
            if skip_test is not None and not bool(inside.any()) and skip_test(p, threshold):
                del z, p, tanh  # as at the loop's end
                continue  # gradient filtering: this chunk's softmax is negligible (configs.py's bounds)
            dz = p.mul_(-g[:, None])
            dz.scatter_add_(1, local[:, None], torch.where(inside, g, 0.0)[:, None])
            if tanh is not None:
                dz.mul_(tanh.square_().neg_().add_(1.0))  # d softcap: 1 - tanh^2, in tanh's buffer
            if transform.has_scale:
                dz.mul_(transform.scale)
            dz_op = dz.to(hidden.dtype) if _half_on_cuda(w_acc) else dz  # the Triton kernel rounds dz so too
            if dh_acc is not None:
                _add_mm_(dh_acc, dz_op, w_acc)
            if grad_w_acc is not None:
                _add_mm_(grad_w_acc[v0:v1], dz_op.T, h_acc)
            if grad_b_acc is not None:
                grad_b_acc[v0:v1] += dz.sum(dim=0)
            # Every name of this chunk's [R, C] buffers, dropped before the next chunk is computed (one at a time).
            del z, p, dz, dz_op, tanh
        if grad_h is not None and dh_acc is not None:
            grad_h[r0:r1] = dh_acc.to(hidden.dtype)
    grad_w = grad_w_acc.to(weight.dtype) if grad_w_acc is not None else None
    grad_b = grad_b_acc.to(bias.dtype) if grad_b_acc is not None and bias is not None else None
    return grad_h, grad_w, grad_b


# filter_mode -> (p [R, C], threshold) -> whether the chunk may be skipped (no target in it: checked apart)
_SKIP_TESTS = {
    "bound": lambda p, thr: float(p.sum(dim=1).max()) < thr,  # every row's chunk mass under its share
    "element": lambda p, thr: float(p.max()) < thr,  # every entry under the threshold
}


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Autograd wrapper: saves only inputs and lse [M]; recomputes logits chunks in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options, chunks):  # type: ignore[override]
        logp, lse = _forward(hidden, weight, bias, targets, options.transform, chunks)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options, ctx.chunks = options, chunks
        return logp.float() if logp.dtype != torch.float64 else logp

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        # A frozen weight (or bias) costs no dW (db) work at all.
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_h, grad_w, grad_b = _backward(
            hidden, weight, bias, targets, lse, grad_out, needs, ctx.options, ctx.chunks
        )
        return grad_h, grad_w, grad_b, None, None, None


def torch_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: OpOptions,
    chunks: TorchChunks = TORCH_CHUNKS,
) -> torch.Tensor:
    """hidden [M, D], weight [V, D], bias [V] or None, targets [M] all valid -> [M] log-probs (fp32;
    fp64 for fp64). options.triton_config does not apply; options.filter_eps works per vocabulary
    chunk; options.transform is the head's scale and softcap."""
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, options, chunks)
