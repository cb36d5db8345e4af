"""`open_model`: the one way every pipeline (sdpo run, sft, eval, self-reward, the toy scorer) gets its 4-bit
model, so that each gets the same safeguards:

- the quantisation settings follow the hardware (compute dtype) and the run (double quantisation);
- the load goes through models.load_quantized, which switches bitsandbytes' CPU repacking off before any forward
  (models/quant.py: disable_cpu_repacking; repacked 4-bit weights lose their gradients);
- on CPU, when the caller asks (`lowmem-sdpo run`'s --bound-cpu-heap), glibc's heap is bounded before the load
  (runtime/cpu_heap.py), and the run says once what that costs and that tcmalloc would not;
- each load says what it loads, with transformers' own "Loading weights" bar off (ours says more);
- the model sits in a holder (runtime/materialise.py), loaded on first use, so that one model is in memory at a
  time and an adapter chain is a swap of forward hooks (exact) or a reload (requantized).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lowmem_sdpo.hf_progress import hf_bars_off
from lowmem_sdpo.models import QuantSettings
from lowmem_sdpo.runtime.cpu_heap import BOUNDED_HEAP_NOTE
from lowmem_sdpo.runtime.cpu_heap import bound_cpu_heap as bound_heap
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.materialise import Holder, Loader, load_for, make_holder
from lowmem_sdpo.runtime.peaks import PhaseEvents
from lowmem_sdpo.runtime.reporting import Reporter


@dataclass
class OpenModel:
    """S from `model_dir` in 4 bit on `hw`, loaded when first asked for."""

    model_dir: Path
    hw: Hardware
    quant: QuantSettings
    holder: Holder

    def model_for(self, chain: Sequence[Path] = ()) -> nn.Module:
        """Q(S) plus the adapters of `chain` (none: Q(S) itself)."""
        return self.holder.model_for(chain)

    def release(self) -> None:
        """Drops the model and returns its memory (the caller drops its own references first)."""
        self.holder.release()


def open_model(
    model_dir: Path,
    hw: Hardware,
    *,
    double_quant: bool = False,
    reference: str = "exact",
    merge: str = "exact",
    reporter: Reporter | None = None,
    purpose: str = "",
    bound_cpu_heap: bool = False,
    events: PhaseEvents | None = None,
) -> OpenModel:
    """`reference`/`merge`: the holder (materialise.REFERENCE_MODES) and, for requantized, the merge of its
    reloads. `reporter`: where the loads are announced (None: silently, as the toy scorer loads). `purpose` ends
    the announcement ("for sampling"). `bound_cpu_heap`: bound glibc's heap first on a CPU run (process-wide
    and permanent: only `run` asks, from its setting of the same name). `events`: phase listeners told of each
    load as the span "load" (runtime/peaks.py PHASE_EVENTS)."""
    if bound_cpu_heap and not hw.is_cuda and bound_heap() and reporter is not None:
        reporter.note_once(BOUNDED_HEAP_NOTE)
    quant = QuantSettings(double_quant=double_quant, compute_dtype=hw.compute_dtype)
    loader = _announced(model_dir, quant, hw, reporter, purpose, events)
    holder = make_holder(reference, loader=loader, merge=merge, quant=quant, device=hw.device)
    return OpenModel(model_dir=model_dir, hw=hw, quant=quant, holder=holder)


def _announced(
    model_dir: Path,
    quant: QuantSettings,
    hw: Hardware,
    reporter: Reporter | None,
    purpose: str,
    events: PhaseEvents | None,
) -> Loader:
    """Loads S (plus merged adapters, in requantized mode) in 4 bit, saying what and why."""
    load = load_for(model_dir, quant, hw.device, reporter.merge_progress() if reporter is not None else None)
    tail = f" {purpose}" if purpose else ""

    def loader(adapters: Sequence[Path], merge: str) -> nn.Module:
        what = "S" if not adapters else f"quantise(S + {len(adapters)} adapter(s)) ({merge} merge)"
        span = events.span("load") if events is not None else nullcontext()
        if reporter is None:
            with hf_bars_off(), span:
                return load(adapters, merge)
        reporter.note(f"loading {what} in 4 bit from {model_dir}{tail}")
        with hf_bars_off(), reporter.phase(f"loading {what} (quantising to NF4 on load)"), span:
            return load(adapters, merge)

    return loader
