"""Test-only: make bitsandbytes believe (or doubt) that this CPU has AVX512-BF16, in every test process.

bitsandbytes' Linear4bit reads `has_avx512bf16()` when a layer is built and, where it is true, repacks the layer's
weight for a no-autograd bf16 CPU kernel at its first eval-mode forward without grad (see
lowmem_sdpo/models/quant.py). Whether a test meets that path would otherwise depend on the host CI lands on.
conftest.py puts this folder on PYTHONPATH, so Python imports this module at start-up in the test process and in
every process a test spawns (CLI runs, kill-and-resume, gloo ranks). It wraps `has_avx512bf16` as bitsandbytes'
layer module imports it; the environment variable, read at call time, decides:
    LOWMEM_SDPO_TEST_BNB_AVX512BF16=1  the feature is there (the layer would repack),
    LOWMEM_SDPO_TEST_BNB_AVX512BF16=0  it is not,
    unset                              the host's own answer.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

ENV = "LOWMEM_SDPO_TEST_BNB_AVX512BF16"
TARGET = "bitsandbytes.nn.modules"  # the module whose Linear4bit.__init__ calls has_avx512bf16()


def simulate(module: ModuleType) -> None:
    """Replace the module's `has_avx512bf16` by one that answers from ENV when it is set."""
    host = module.has_avx512bf16

    def has_avx512bf16() -> bool:
        value = os.environ.get(ENV)
        return host() if value is None else value == "1"

    module.has_avx512bf16 = has_avx512bf16


class _WrappingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        simulate(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _WrappingLoader(spec.loader)
        return spec


def install() -> None:
    if TARGET in sys.modules:
        simulate(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
