"""Imports run one way: each module of lowmem_sdpo imports only from its own layer or the layers below it (the
README's Layout section states the same order), lowmem_sdpo_kernels needs only the standard library, torch and
triton, and no two modules import each other, directly or round a loop.

The imports are read from the source with `ast`, every one of them: at module level, inside functions (a
function-level import is still a dependency, only a later one) and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "lowmem_sdpo": ROOT / "lowmem_sdpo",
    "lowmem_sdpo_kernels": ROOT / "kernels" / "lowmem_sdpo_kernels",
}

# Lowest first. A module belongs to the layer of the longest name here that is it or a package above it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("lowmem_sdpo_kernels",)),
    (
        "foundation",
        (
            "lowmem_sdpo",  # the package itself: its version
            "lowmem_sdpo.errors",
            "lowmem_sdpo.atomic",
            "lowmem_sdpo.checks",
            "lowmem_sdpo.hub",
            "lowmem_sdpo.host",
            "lowmem_sdpo.allocators",
            "lowmem_sdpo.hf_progress",
            "lowmem_sdpo.settings_record",
            "lowmem_sdpo.model_aliases",
        ),
    ),
    ("data, losses, tasks", ("lowmem_sdpo.data", "lowmem_sdpo.losses", "lowmem_sdpo.verifiable")),
    ("models", ("lowmem_sdpo.models",)),
    ("runtime", ("lowmem_sdpo.runtime",)),
    (
        "engine stages, trackers, plan",
        (
            "lowmem_sdpo.engine.config",
            "lowmem_sdpo.engine.units",
            "lowmem_sdpo.engine.reference",
            "lowmem_sdpo.engine.training",
            "lowmem_sdpo.engine.rundir",
            "lowmem_sdpo.trackers",
            "lowmem_sdpo.plan",
        ),
    ),
    (
        "pipelines",
        (
            "lowmem_sdpo.engine",  # the package's face: run_sdpo
            "lowmem_sdpo.engine.run",
            "lowmem_sdpo.sft",
            "lowmem_sdpo.eval",
            "lowmem_sdpo.selfreward",
            "lowmem_sdpo.toy",
            "lowmem_sdpo.report",
        ),
    ),
    ("cli", ("lowmem_sdpo.cli", "lowmem_sdpo.__main__")),
]
KERNEL_DEPENDENCIES = {"torch", "triton"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (for `from X import name`, X.name when that is a module, else X)
    line: int


def module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            found[module_name(package, root, path)] = path
    return found


MODULES = all_modules()


def _absolute(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(name: str, path: Path) -> list[Import]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(name, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append(Import(name, sub if sub in MODULES else module, node.lineno))
    return found


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for index, (_, names) in enumerate(LAYERS):
        for prefix in names:
            # The package itself ("lowmem_sdpo") names only its __init__, not everything under it, so that a new
            # package without a layer fails test_every_module_has_a_layer instead of landing in the foundation.
            below = module.startswith(prefix + ".") and prefix != "lowmem_sdpo"
            if (module == prefix or below) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def own_imports() -> list[Import]:
    return [i for name, path in MODULES.items() for i in imports_of(name, path) if i.target in MODULES]


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []
    assert "lowmem_sdpo.runtime.open_model" in MODULES  # the walk finds the package's modules


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{i.source} (line {i.line}, {LAYERS[layer_of(i.source)][0]}) imports {i.target} "
        f"({LAYERS[layer_of(i.target)][0]})"
        for i in own_imports()
        if layer_of(i.target) > layer_of(i.source)
    ]
    assert upward == []


def test_the_layer_check_sees_function_level_and_relative_imports(tmp_path):
    # The checker itself, on a module it has not seen: an import inside a function, a relative one.
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from lowmem_sdpo.cli import main\n\nfrom .hub import hub_offline\n")
    found = {(i.target, i.line) for i in imports_of("lowmem_sdpo.probe", path)}
    assert found == {("lowmem_sdpo.cli", 2), ("lowmem_sdpo.hub", 4)}
    assert layer_of("lowmem_sdpo.cli") > layer_of("lowmem_sdpo.data.loading") > layer_of("lowmem_sdpo.errors")
    assert layer_of("lowmem_sdpo.engine.rundir.layout") < layer_of("lowmem_sdpo.engine.run")


def test_kernels_need_only_torch_triton_and_the_standard_library():
    outside = sorted(
        f"{name} (line {i.line}) imports {i.target}"
        for name, path in MODULES.items()
        if name.startswith("lowmem_sdpo_kernels")
        for i in imports_of(name, path)
        if (top := i.target.split(".")[0]) not in KERNEL_DEPENDENCIES
        and top not in sys.stdlib_module_names
        and top != "lowmem_sdpo_kernels"
        and top != "__future__"
    )
    assert outside == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package):
    # A package's __init__ that imports its own modules, which import the package's names back, would be a
    # loop; a module importing itself is not one.
    edges: dict[str, set[str]] = {}
    for i in own_imports():
        if i.source.split(".")[0] == package and i.source != i.target:
            edges.setdefault(i.source, set()).add(i.target)
    assert _cycles(edges) == []
