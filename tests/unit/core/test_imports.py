"""Every module of both packages imports cleanly (no import-time errors, no missing dependency), and every package
imports alone in a fresh interpreter."""

import importlib
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

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


def packages_and_top_modules():
    """Every package (subpackages too) and every module directly under lowmem_sdpo or lowmem_sdpo_kernels."""
    names = []
    for package in (lowmem_sdpo, lowmem_sdpo_kernels):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            if info.ispkg or info.name.count(".") == 1:
                names.append(info.name)
    return names


def _import_alone(name: str) -> tuple[str, int, str]:
    # -I: isolated (no user site, no PYTHON* variables), so the path is handed over explicitly.
    code = f"import sys; sys.path[:0] = {sys.path!r}; import {name}"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300)
    return name, done.returncode, done.stderr.strip().splitlines()[-1:]


def test_every_package_imports_alone_in_a_fresh_interpreter():
    # One interpreter per name: importing everything in one process (test_module_imports) hides an import
    # cycle that only bites when a package is imported first. Run side by side; each is a separate process.
    names = packages_and_top_modules()
    assert (
        "lowmem_sdpo.runtime" in names
        and "lowmem_sdpo.engine.rundir" in names
        and "lowmem_sdpo.errors" in names
    )
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failed = [(n, err) for n, rc, err in pool.map(_import_alone, names) if rc != 0]
    assert failed == []
