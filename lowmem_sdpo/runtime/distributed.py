"""Data-parallel sDPO over torch.distributed ranks (`accelerate launch` / torchrun start them).

Every rank holds the whole model (Q(S) + the frozen delta + the LoRA being trained) and the whole reference
table; each optimiser step's global micro-batches (the schedule of a one-process run with batch_size x ranks
per micro-batch) are cut into one contiguous part per rank, each rank backpropagates its part with the loss
already scaled by the global window, and the LoRA gradients are summed across ranks before clipping: every
rank then takes the same optimiser step. The effective batch is batch_size x grad_accum x ranks.

A run starts distributed only when the launcher's environment says so (WORLD_SIZE > 1); a single process gets
`SINGLE`, whose collectives are identities, and never touches torch.distributed. Collectives run on the
tensors' own device: gloo for CPU tensors, NCCL for CUDA ones ("cpu:gloo,cuda:nccl").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowmem_sdpo.errors import InputError

# The seed of rank r's RNG stream (dropout) is seed + r * RANK_SEED_STRIDE: rank 0 keeps the one-process
# stream, the others draw their own masks.
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, and the few collectives the engine needs."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file of the run directory; the others only read."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    def seed(self, seed: int) -> int:
        return seed + self.rank * RANK_SEED_STRIDE

    def shard(self, items: Sequence[int]) -> list[int]:
        """This rank's contiguous part of a global micro-batch: parts differ in size by at most one (a short
        last micro-batch may leave a rank none)."""
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start : start + base + (self.rank < extra)])

    def barrier(self) -> None:
        if self.is_distributed:
            torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise sum over ranks."""
        if self.is_distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (one decision all ranks take alike)."""
        if not self.is_distributed:
            return flag
        # On CPU: gloo takes it whatever the model's device ("cpu:gloo,cuda:nccl"), and NCCL would need a
        # host sync for .item() anyway.
        t = torch.tensor([int(not flag)])
        return int(self.sum_(t).item()) == 0

    def any_(self, flag: bool) -> bool:
        return not self.all_(not flag)

    def gather_cat(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(all ranks' tensors concatenated along dim 0 in rank order, each rank's length); lengths may
        differ, and be 0. Gathered values carry no autograd history."""
        if not self.is_distributed:
            return tensor, [tensor.shape[0]]
        n = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, n)
        lengths = [int(s.item()) for s in sizes]
        width = max(lengths)
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)]), lengths

    def objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.is_distributed:
            return [obj]
        found: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(found, obj)
        return found

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: rank 0's values everywhere (replicas start equal whatever each rank computed)."""
        if self.is_distributed:
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)

    def sum_grads_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sums the parameters' gradients over ranks in one collective (a missing gradient counts as 0: a rank
        whose part of the window was empty)."""
        if not self.is_distributed or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()


SINGLE = Ranks()


# Launcher modes that shard the model, which this engine does not do: each rank holds all of Q(S). Running on
# under them would replicate the model on every card (out of memory where FSDP was meant to make it fit), so
# they are refused. Variable accelerate sets -> why.
SHARDING_LAUNCHERS: dict[str, str] = {
    "ACCELERATE_USE_FSDP": (
        "an FSDP accelerate config: the engine runs data-parallel replicas (every rank holds the whole 4-bit "
        "model) and does not shard it with FSDP yet; launch without the FSDP config (README: Several GPUs)"
    ),
    "ACCELERATE_USE_DEEPSPEED": (
        "a DeepSpeed accelerate config: the engine runs data-parallel replicas and does not use DeepSpeed; "
        "launch without it (README: Several GPUs)"
    ),
}


def check_launcher() -> None:
    """InputError for a launcher mode the engine cannot honour (see SHARDING_LAUNCHERS)."""
    for variable, why in SHARDING_LAUNCHERS.items():
        if os.environ.get(variable, "").lower() in ("true", "1", "yes"):
            raise InputError(f"launched with {why}")


def launched_world() -> int:
    """The number of ranks the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """SINGLE in one process; under a launcher, joins (or reuses) the process group for the block. Each rank
    on a CUDA machine takes the card of its LOCAL_RANK before anything allocates on one."""
    check_launcher()
    if launched_world() <= 1:
        yield SINGLE
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    try:
        yield Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    finally:
        if created:
            dist.destroy_process_group()
