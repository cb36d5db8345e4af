"""benchmarks/gpu_pass.sh on CPU: its --dry-run names only commands that exist here (files, modules, pytest markers,
CLI subcommands and flags, benchmark shapes), its copies of other settings agree with their sources, and a part whose
time budget is spent records every command as skipped."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lowmem_sdpo.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_pass.sh"
WHEELS_SH = REPO.parent / "shared" / "device" / "wheels.sh"  # the shared helper the device README names
REPO_DIRS = ("benchmarks/", "tests/", "examples/", "lowmem_sdpo/", "kernels/")
# Not Python and not in the repo: present on the GPU machine, checked there by the pass itself.
SYSTEM_TOOLS = frozenset({"nvidia-smi"})
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {
        k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_PASS_PYTHON", "GPU_PASS_PART_SECONDS")
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env={**base, **(env or {})}, capture_output=True, text=True
    )


def dry_run_lines(*parts: str, out: str = "/nonexistent/gpu-pass-out") -> list[str]:
    """The lines of `OUT=out gpu_pass.sh PARTS --dry-run`, comments dropped. OUT outside the repo, so that the
    result paths it names are not taken for repository files that must exist."""
    result = _script(*parts, "--dry-run", env={"OUT": out})
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip() and not line.startswith("#")]


def dry_run(*parts: str) -> list[list[str]]:
    return [shlex.split(line) for line in dry_run_lines(*parts)]


def _command(argv: list[str]) -> list[str]:
    """Leading VAR=value assignments and a trailing `> file` redirection removed."""
    while argv and ENV_ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    return argv[: argv.index(">")] if ">" in argv else argv


def _pyproject_markers(pytestconfig: pytest.Config) -> set[str]:
    """Marker names registered in pyproject.toml's [tool.pytest.ini_options] (on Python 3.10, without tomllib,
    the ini markers pytest read from it, plugins' own included)."""
    if sys.version_info >= (3, 11):
        import tomllib

        lines = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
            "markers"
        ]
    else:
        lines = pytestconfig.getini("markers")
    return {line.split(":")[0].strip() for line in lines}


def _cli_subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]  # argparse keeps subparsers as an action
    return set(sub.choices)


def _load_script_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _check_repo_paths(argv: list[str]) -> None:
    for token in argv:
        for item in token.split(","):
            item = item.split("=", 1)[-1]
            if item.startswith(REPO_DIRS) or item.endswith(".py"):
                assert (REPO / item).exists(), f"{item} (named by gpu_pass.sh) does not exist"


def _check_pytest(args: list[str], markers: set[str]) -> None:
    i = 0
    while i < len(args):
        if args[i] == "-m":
            used = set(re.findall(r"[A-Za-z_]\w*", args[i + 1])) - {"and", "or", "not"}
            assert used <= markers, f"pytest markers {used - markers} are not registered in pyproject.toml"
            i += 2
        elif args[i] == "-k":
            i += 2
        else:
            i += 1


def _check_lowmem_sdpo(args: list[str]) -> None:
    assert args[0] in _cli_subcommands(), f"lowmem-sdpo {args[0]} is not a registered subcommand"
    build_parser().parse_args(args)  # SystemExit on an unknown flag or a bad value


def _check_python(argv: list[str], markers: set[str]) -> None:
    if argv[1] == "-c":
        tree = ast.parse(argv[2])
        names = [
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        ]
        for name in names:
            assert importlib.util.find_spec(name) is not None, f"{name} (imported by gpu_pass.sh) is missing"
        return
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
        if module == "pytest":
            _check_pytest(args, markers)
        elif module == "lowmem_sdpo":
            _check_lowmem_sdpo(args)
        return
    assert (REPO / argv[1]).is_file(), f"{argv[1]} (run by gpu_pass.sh) does not exist"


def test_dry_run_names_only_commands_that_exist(pytestconfig):
    """Fails while a file the pass runs is missing: benchmarks/bench_e2e.py and tests/test_gpu.py included."""
    markers = _pyproject_markers(pytestconfig)
    commands = [_command(argv) for argv in dry_run("all")]
    assert commands
    for argv in commands:
        _check_repo_paths(argv)
        if argv[0] in SYSTEM_TOOLS:
            continue
        assert Path(argv[0]).name.startswith("python"), f"unexpected command {argv[0]}"
        _check_python(argv, markers)


def test_every_part_runs_something_and_every_gpu_test_is_in_one_part():
    parts = {"kernels", "engine"} | {
        f"e2e-{s}-{k}" for s in ("solar-2048", "solar-4096", "llama3-8b-2048") for k in ("ours", "trl")
    }
    pytest_k = []
    for part in parts:
        commands = dry_run(part)[2:]  # after the two setup commands every part shares
        assert commands, part
        pytest_k += [argv[argv.index("-k") + 1] for argv in commands if "pytest" in argv]
    # kernels takes `-k kernel`, engine `-k 'not kernel'`: together every gpu-marked test, each once.
    assert sorted(pytest_k) == ["kernel", "not kernel"]


def test_benchmark_arguments_are_the_benchmarks_own():
    bench_kernels = _load_script_module(REPO / "benchmarks" / "bench_kernels.py")
    bench_e2e = _load_script_module(REPO / "benchmarks" / "bench_e2e.py")
    grid = bench_kernels.parse_args([])
    sliced = set()
    for argv in map(_command, dry_run("kernels")):
        if "benchmarks/bench_kernels.py" in argv:
            args = bench_kernels.parse_args(argv[2:])
            sliced |= {(n, v) for n in args.n for v in args.v}
    assert sliced == {(n, v) for n in grid.n for v in grid.v}  # every shape of the full grid
    plans = {}
    for argv in map(_command, dry_run("e2e")):
        if "benchmarks/bench_e2e.py" in argv:
            shapes = argv[argv.index("--shapes") + 1 : argv.index("--systems")]
            systems = argv[argv.index("--systems") + 1 : argv.index("--out")]
            assert set(shapes) <= set(bench_e2e.SHAPES) and set(systems) <= set(bench_e2e.SYSTEMS)
            assert argv[argv.index("--device") + 1] == "cuda"
        elif "plan" in argv:
            plans[shapes[0]] = build_parser().parse_args(argv[3:])
    assert set(plans) == set(bench_e2e.DEFAULT_SHAPES["cuda"])
    for name, args in plans.items():
        shape = bench_e2e.SHAPES[name]
        assert (args.max_length, args.batch_size, args.grad_accum, args.steps) == (
            shape.seq_len,
            shape.batch,
            shape.accum,
            f"{shape.pairs},{shape.pairs}",
        )
        config = json.loads((REPO / args.model / "config.json").read_text())
        dims = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        assert [config[k] for k in (*dims, "intermediate_size")] == [
            shape.vocab,
            shape.hidden,
            shape.layers,
            shape.heads,
            shape.kv_heads,
            shape.intermediate,
        ]


def test_the_cuda_demo_run_uses_the_demos_settings():
    from lowmem_sdpo.cli.demo_cmd import DEMO_SETTINGS
    from lowmem_sdpo.cli.run_cmd import config_from_args

    (argv,) = [a for a in map(_command, dry_run("engine")) if a[3:4] == ["run"]]
    config = config_from_args(build_parser().parse_args(argv[3:]))
    assert config.device == "cuda"
    assert {k: getattr(config, k) for k in DEMO_SETTINGS if k != "device"} == {
        k: v for k, v in DEMO_SETTINGS.items() if k != "device"
    }


@pytest.mark.skipif(not WHEELS_SH.is_file(), reason=f"{WHEELS_SH} is not on this machine")
def test_the_install_line_is_the_one_wheels_sh_prints():
    (printed,) = [line for line in WHEELS_SH.read_text().splitlines() if "pip install" in line]
    install, export = printed.strip().removeprefix("echo '").rstrip("';").split(" && ")
    source = SCRIPT.read_text()
    (ours,) = re.findall(r'^WHEELS_INSTALL="(.*)"$', source, flags=re.MULTILINE)
    assert ours.replace("$PY", "python3") == install
    assert export.split(" || ")[0].replace("$PWD", "$REPO") in source


def test_a_spent_budget_skips_every_command_and_records_it(tmp_path):
    result = _script("kernels", env={"OUT": str(tmp_path), "GPU_PASS_PART_SECONDS": "0"})
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "gpu_pass_kernels.json").read_text())
    listed = [line for line in dry_run_lines("kernels", out=str(tmp_path)) if "pip install" not in line]
    assert [row["command"] for row in summary["commands"]] == listed
    assert not summary["passed"]
    assert all(row["exit"] is None and row["note"].startswith("skipped") for row in summary["commands"])


@pytest.mark.parametrize("args", [["bogus"], ["e2e-nowhere-ours"], [], ["--frobnicate", "kernels"]])
def test_a_bad_part_is_refused_with_the_usage(args):
    result = _script(*args, "--dry-run")
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_pass.sh" in result.stderr
