"""Every module of both packages imports cleanly (no import-time errors, no missing dependency)."""

import importlib
import pkgutil

import pytest

import lowmem_sdpo
import lowmem_sdpo_kernels


def all_modules():
    names = []
    for package in (lowmem_sdpo, lowmem_sdpo_kernels):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return names


def test_both_packages_have_modules():
    names = all_modules()
    assert "lowmem_sdpo.data.loading" in names
    assert any(n.startswith("lowmem_sdpo_kernels.") for n in names) or "lowmem_sdpo_kernels" in names


@pytest.mark.parametrize("name", all_modules())
def test_module_imports(name):
    importlib.import_module(name)
