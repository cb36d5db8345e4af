"""Live tensor bytes of a call, read from the allocator's own events: what the plan's estimates are checked
against on CPU, where there is no max_memory_allocated.

    trace = trace_live_tensors(lambda: loss_fn().backward())
    trace.peak_bytes, trace.top(10)

torch.profiler with profile_memory=True records every allocation and free the CPU allocator makes (bitsandbytes'
and the log-prob kernels' tensors included: they are torch tensors). Replaying them in time order gives the
bytes allocated during the call and still alive at each moment; the largest is the peak, and the allocations
alive then are listed with the op that made them, the module it ran in and the phase (forward, the
checkpointed recompute, backward, optimiser). Tensors alive before the call (weights) are not counted.
This is the tensors' memory, not the process's: RSS adds whatever the C allocator keeps (runtime/cpu_heap.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Frames under these paths say nothing about who asked for the memory; the first frame outside them does.
_PLUMBING = re.compile(r"(^|/)(torch|contextlib|functools|threading)[/.]|^<built-in")
_MODULE = re.compile(r"^nn\.Module: (\w+?)(_\d+)?$")


@dataclass(frozen=True)
class Allocation:
    bytes: int
    ptr: int
    op: str  # innermost aten op
    phase: str  # forward, recompute, backward or optimizer
    module: str | None  # module class it ran in (None outside any)
    site: str | None  # first Python frame outside torch: file(line): function

    def key(self) -> tuple[str, str, str | None, str | None]:
        return (self.phase, self.op, self.module, self.site)


@dataclass
class LiveTrace:
    peak_bytes: int
    at_peak: list[Allocation] = field(default_factory=list)
    allocated_bytes: int = 0  # every allocation of the call added up (churn, not a peak)

    def bytes_where(self, keep: Callable[[Allocation], bool]) -> int:
        return sum(a.bytes for a in self.at_peak if keep(a))

    def top(self, n: int = 20) -> list[dict[str, Any]]:
        """The allocations alive at the peak grouped by (phase, op, module, site), largest first."""
        groups: dict[tuple[str, str, str | None, str | None], list[int]] = {}
        for a in self.at_peak:
            g = groups.setdefault(a.key(), [0, 0])
            g[0] += a.bytes
            g[1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:n]
        return [
            {"phase": k[0], "op": k[1], "module": k[2], "site": k[3], "bytes": v[0], "tensors": v[1]}
            for k, v in rows
        ]

    def by_phase(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.at_peak:
            out[a.phase] = out.get(a.phase, 0) + a.bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _describe(node: Any) -> tuple[str, str, str | None, str | None]:
    from torch._C._profiler import _EventType

    ops: list[str] = []
    module = site = None
    names: list[str] = []
    parent = node.parent
    while parent is not None:
        name = parent.name
        names.append(name)
        if parent.tag == _EventType.TorchOp:
            ops.append(name)
        elif parent.tag == _EventType.PyCall:
            match = _MODULE.match(name)
            if match and module is None:
                module = match.group(1)
            elif not match and site is None and not _PLUMBING.search(name.split("(")[0]):
                site = name
        parent = parent.parent
    joined = " ".join(names)
    if "autograd::engine::evaluate_function" in joined:
        phase = "recompute" if "recompute_fn" in joined or "unpack_hook" in joined else "backward"
    elif "Optimizer.step" in joined or "optimizer.py" in joined:
        phase = "optimizer"
    else:
        phase = "forward"
    return (ops[0] if ops else "?"), phase, module, site


def trace_live_tensors(fn: Callable[[], Any], *, attribute: bool = True) -> LiveTrace:
    """Runs fn under the profiler and replays its allocations. `attribute` records Python stacks and modules
    (slower) so that the tensors alive at the peak say where they come from."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=attribute, with_modules=attribute
    ) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append(node)
    # A free and a new allocation at one address in the same nanosecond: the free came first.
    events.sort(key=lambda n: (n.start_time_ns, n.extra_fields.alloc_size > 0))
    current = peak = churn = 0
    peak_at = -1
    sizes: dict[int, int] = {}
    for i, node in enumerate(events):
        size, ptr = int(node.extra_fields.alloc_size), int(node.extra_fields.ptr)
        if size > 0:
            sizes[ptr] = size
            current += size
            churn += size
            if current > peak:
                peak, peak_at = current, i
        elif ptr in sizes:  # a free of a tensor made before the call is not ours to count
            current -= sizes.pop(ptr)
    live: dict[int, Any] = {}  # second replay, up to the peak: who was alive then
    for node in events[: peak_at + 1]:
        size, ptr = int(node.extra_fields.alloc_size), int(node.extra_fields.ptr)
        if size > 0:
            live[ptr] = node
        else:
            live.pop(ptr, None)
    peak_nodes = [(ptr, int(node.extra_fields.alloc_size), node) for ptr, node in live.items()]
    at_peak = []
    for ptr, size, node in peak_nodes:
        op, phase, module, site = _describe(node)
        at_peak.append(Allocation(size, ptr, op, phase, module, site))
    return LiveTrace(peak, at_peak, churn)
