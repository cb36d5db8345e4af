"""runtime/open_model.py: the one loading sequence of every pipeline. Nothing loads before the model is asked for;
the quantisation settings follow the hardware and the run; the load is announced once; every 4-bit layer is kept
off bitsandbytes' CPU repacking (on a host with AVX512-BF16 too); the CPU heap is bounded only when asked, on CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from lowmem_sdpo.models import QuantSettings
from lowmem_sdpo.models.quant import CPU_REPACKING_SWITCH
from lowmem_sdpo.runtime import open_model as open_model_module
from lowmem_sdpo.runtime.hardware import DeviceCaps, Hardware
from lowmem_sdpo.runtime.open_model import open_model
from lowmem_sdpo.runtime.reporting import Reporter
from tests.support.model_fixtures import write_llama

CPU = Hardware(torch.device("cpu"), "float32")


class Notes(Reporter):
    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_loads_on_first_use_once_announced_with_repacking_off(tmp_path, bnb_cpu_kind):
    model_dir = write_llama(tmp_path / "s")
    reporter = Notes()
    opened = open_model(model_dir, CPU, double_quant=True, reporter=reporter, purpose="for sampling")
    assert reporter.notes == []  # nothing loaded yet
    assert opened.quant == QuantSettings(double_quant=True, compute_dtype="float32")
    model = opened.model_for()
    assert opened.model_for([]) is model  # S is loaded once
    assert reporter.notes == [f"loading S in 4 bit from {model_dir} for sampling"]
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    if bnb_cpu_kind == "present":  # a bitsandbytes that would repack has the switch: every layer has it off
        assert all(getattr(m, CPU_REPACKING_SWITCH) is False for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not any(p.requires_grad for p in model.parameters())
    opened.release()


def test_the_cpu_heap_is_bounded_only_when_asked_and_only_on_cpu(tmp_path, monkeypatch):
    calls: list[int] = []
    bounded = [True]
    monkeypatch.setattr(open_model_module, "bound_heap", lambda: calls.append(1) or bounded[0])
    model_dir = tmp_path / "never-loaded"  # the holder loads on first use: none of these touches the files
    reporter = Notes()
    open_model(model_dir, CPU, reporter=reporter)
    assert calls == [] and reporter.notes == []
    open_model(model_dir, CPU, bound_cpu_heap=True, reporter=reporter)
    assert calls == [1]
    # Bounded (glibc): the run says so once, with the way to tcmalloc.
    assert len(reporter.notes) == 1 and "apt install libtcmalloc-minimal4" in reporter.notes[0]
    open_model(model_dir, CPU, bound_cpu_heap=True, reporter=reporter)
    assert calls == [1, 1] and len(reporter.notes) == 1
    # On another malloc the bound is not set (bound_cpu_heap returns False): nothing to say.
    bounded[0] = False
    quiet_about_it = Notes()
    open_model(model_dir, CPU, bound_cpu_heap=True, reporter=quiet_about_it)
    assert quiet_about_it.notes == []
    cuda = Hardware(torch.device("cuda", 0), "bfloat16", caps=DeviceCaps(capability=(8, 0), bf16=True))
    opened = open_model(model_dir, cuda, bound_cpu_heap=True, reporter=quiet_about_it)
    assert calls == [1, 1, 1] and quiet_about_it.notes == []
    assert opened.quant.compute_dtype == "bfloat16"
