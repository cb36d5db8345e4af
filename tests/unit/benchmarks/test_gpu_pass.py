"""benchmarks/gpu_pass.sh on CPU: its --dry-run names only commands that exist here (files, modules, pytest markers,
CLI subcommands and flags, benchmark shapes), its copies of other settings agree with their sources, every part's
estimate fits its budget (first-look: 8 minutes with the wheels' install), and, with a fake runner in place of the
commands, the part's JSON is rewritten after every command, a command that no longer fits the budget is skipped and
said so, a failed preflight stops the part, and the commit comes from the CPU side."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lowmem_sdpo.cli import build_parser

REPO = Path(__file__).resolve().parents[3]
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


ESTIMATE = re.compile(r"^(?P<command>.*\S)  # ~(?P<seconds>\d+)s$")


def dry_run_estimates(*parts: str, out: str = "/nonexistent/gpu-pass-out", **env: str) -> list[tuple[str, int]]:
    """(command, estimated seconds) of each line of `OUT=out gpu_pass.sh PARTS --dry-run` that is a command
    (comment lines dropped). OUT outside the repo, so that the result paths it names are not taken for
    repository files that must exist."""
    result = _script(*parts, "--dry-run", env={"OUT": out, **env})
    assert result.returncode == 0, result.stderr
    found = []
    for line in result.stdout.splitlines():
        if line.strip() and not line.startswith("#"):
            match = ESTIMATE.match(line)
            assert match, f"no estimate on {line!r}"
            found.append((match["command"], int(match["seconds"])))
    return found


def dry_run_lines(*parts: str, out: str = "/nonexistent/gpu-pass-out", **env: str) -> list[str]:
    return [command for command, _ in dry_run_estimates(*parts, out=out, **env)]


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
    """Fails while a file the pass runs is missing: benchmarks/bench_e2e.py and tests/gpu/test_gpu.py included."""
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
    parts = {"first-look", "kernels", "kernels-grid-32000", "kernels-grid-128256", "kernels-variants", "engine"} | {
        f"e2e-{s}-{k}" for s in ("solar-2048", "solar-4096", "llama3-8b-2048") for k in ("ours", "trl")
    }
    pytest_k = []
    for part in parts:
        preflight, *commands = dry_run(part)  # every part starts with the preflight
        assert preflight[1] == "benchmarks/preflight.py" and "--need-gpu" in preflight, part
        assert commands, part
        pytest_k += [argv[argv.index("-k") + 1] for argv in commands if "pytest" in argv]
    # kernels takes `-k kernel`, engine `-k 'not kernel'`: together every gpu-marked test, each once.
    assert sorted(pytest_k) == ["kernel", "not kernel"]


def test_benchmark_arguments_are_the_benchmarks_own():
    bench_kernels = _load_script_module(REPO / "benchmarks" / "bench_kernels.py")
    bench_e2e = _load_script_module(REPO / "benchmarks" / "bench_e2e.py")
    grid = bench_kernels.parse_args([])
    sliced = set()
    for argv in map(_command, dry_run("kernels", "kernels-grid")):
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
    install, export = printed.strip().removeprefix("echo ").strip("'\";").split(" && ")
    source = SCRIPT.read_text()
    (ours,) = re.findall(r'^WHEELS_INSTALL="(.*)"$', source, flags=re.MULTILINE)
    assert ours.replace("$PY", "python3").replace("DIR/", "$dir/") == install
    assert export.split(" || ")[0].replace("\\$PWD", "$REPO").replace("$PWD", "$REPO") in source
    sets = re.findall(r"^\s+[\w-]+\)\s+dir=(\S+);", WHEELS_SH.read_text(), flags=re.MULTILINE)
    (ours_sets,) = re.findall(r"^WHEEL_SETS=\((.*)\)$", source, flags=re.MULTILINE)
    assert sets == ours_sets.split()  # every set wheels.sh fetches is installed when carried


def test_a_spent_budget_skips_every_command_and_records_it(tmp_path):
    result = _script("kernels", env={"OUT": str(tmp_path), "GPU_PASS_PART_SECONDS": "0"})
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "gpu_pass_kernels.json").read_text())
    listed = dry_run_estimates("kernels", out=str(tmp_path))
    assert [(row["command"], row["estimate_s"]) for row in summary["commands"]] == listed
    assert not summary["passed"] and summary["state"] == "finished"
    assert all(row["exit"] is None and row["note"].startswith("skipped") for row in summary["commands"])


@pytest.mark.parametrize("args", [["bogus"], ["e2e-nowhere-ours"], [], ["--frobnicate", "kernels"]])
def test_a_bad_part_is_refused_with_the_usage(args):
    result = _script(*args, "--dry-run")
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_pass.sh" in result.stderr


# ------------------------------------------------------------------------- first-look, and the runner's rules

FIRST_LOOK_LIMIT_S = 8 * 60  # one device call: the cold start and the 10-minute cap leave this much


def test_first_look_fits_one_call_and_every_part_its_budget():
    # The install of the core wheels (a comment when .whl/ is absent here) is part of first-look's call.
    result = _script("first-look", "--dry-run", env={"OUT": "/nonexistent/gpu-pass-out"})
    (install,) = [int(m) for m in re.findall(r"pip install .* # ~(\d+)s$", result.stdout, flags=re.MULTILINE)]
    estimates = [seconds for _, seconds in dry_run_estimates("first-look")]
    (total,) = [int(m) for m in re.findall(r"^# total: ~(\d+)s$", result.stdout, flags=re.MULTILINE)]
    assert total == install + sum(estimates) <= FIRST_LOOK_LIMIT_S
    for part in ("kernels", "kernels-grid-32000", "kernels-grid-128256", "kernels-variants", "engine",
                 "e2e-solar-2048-ours", "e2e-solar-2048-trl"):
        out = _script(part, "--dry-run", env={"OUT": "/nonexistent/gpu-pass-out"}).stdout
        ((spent, budget),) = re.findall(r"^# part \S+: ~(\d+)s of (\d+)s$", out, flags=re.MULTILINE)
        assert sum(s for _, s in dry_run_estimates(part)) == int(spent) <= int(budget), part


def test_first_look_measures_what_the_issue_names():
    bench_kernels = _load_script_module(REPO / "benchmarks" / "bench_kernels.py")
    bench_e2e = _load_script_module(REPO / "benchmarks" / "bench_e2e.py")
    commands = [_command(argv) for argv in dry_run("first-look")]
    kernels = [bench_kernels.parse_args(argv[2:]) for argv in commands if argv[1] == "benchmarks/bench_kernels.py"]
    assert sorted(v for args in kernels for v in args.v) == [32000, 128256]
    for args in kernels:
        assert (args.n, args.d) == ([16384], 4096)
        assert {"ours-triton", "apple-cce", "liger-flce", "liger-flce-sum", "naive-torch"} <= set(args.impls)
    (e2e,) = [argv for argv in commands if argv[1] == "benchmarks/bench_e2e.py"]
    layers = int(e2e[e2e.index("--layers") + 1])
    shape = bench_e2e.SHAPES[e2e[e2e.index("--shapes") + 1]]
    assert shape.hidden == 4096 and shape.vocab == 32000 and 0 < layers < shape.layers  # SOLAR's width, fewer layers
    assert re.search(rf"^FIRST_LOOK_LAYERS={layers}$", SCRIPT.read_text(), flags=re.MULTILINE)  # what --prepare plans


def _fake_runner(tmp_path: Path, fail: str | None = None) -> str:
    """A runner in place of `bash -c CMD`: records, for each command, how many commands the part's JSON listed as
    done when it started; exits 1 for a command containing `fail`."""
    script = tmp_path / "runner.py"
    script.write_text(
        "import json, pathlib, sys\n"
        f"out = pathlib.Path({str(tmp_path / 'out')!r})\n"
        "summary = json.loads((out / 'gpu_pass_first-look.json').read_text())\n"
        "done = sum(1 for row in summary['commands'] if row['exit'] is not None or row['note'])\n"
        "with open(out / 'seen.jsonl', 'a') as f:\n"
        "    f.write(json.dumps({'command': sys.argv[1], 'done_before': done, 'state': summary['state']}) + '\\n')\n"
        f"sys.exit(1 if {fail!r} and {fail!r} in sys.argv[1] else 0)\n"
    )
    return f"{sys.executable} {script}"


def _first_look(tmp_path: Path, runner: str, seconds: int | None = None, **env: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {"OUT": str(out), "GPU_PASS_RUNNER": runner, "GPU_PASS_PYTHON": sys.executable, **env}
    if seconds is not None:
        env["GPU_PASS_PART_SECONDS"] = str(seconds)
    result = _script("first-look", env=env)
    summary = json.loads((out / "gpu_pass_first-look.json").read_text())
    seen = [json.loads(line) for line in (out / "seen.jsonl").read_text().splitlines()]
    assert (result.returncode == 0) == summary["passed"], result.stderr
    return summary, seen


def test_the_part_json_is_rewritten_after_every_command(tmp_path):
    summary, seen = _first_look(tmp_path, _fake_runner(tmp_path), LOWMEM_SDPO_COMMIT="abc1234")
    listed = dry_run_lines("first-look", out=str(tmp_path / "out"), GPU_PASS_PYTHON=sys.executable)
    assert [s["command"] for s in seen] == listed  # every command ran, in order
    # When command k starts, the JSON on disk already holds the k - 1 before it: a call cut at its limit keeps them.
    assert [s["done_before"] for s in seen] == list(range(len(listed)))
    assert all(s["state"] == "running" for s in seen)
    assert summary["state"] == "finished" and summary["passed"] and summary["commit"] == "abc1234"
    assert [row["exit"] for row in summary["commands"]] == [0] * len(listed)


def test_a_command_the_budget_no_longer_fits_is_skipped_and_said_so(tmp_path):
    # 140 s: the preflight (~20 s) and the V 32000 benchmark (~110 s) fit, the e2e step (~150 s) no longer does,
    # the V 128256 benchmark (~120 s) does again (the fake commands take no time).
    summary, seen = _first_look(tmp_path, _fake_runner(tmp_path), seconds=140)
    estimates = dict(dry_run_estimates("first-look", out=str(tmp_path / "out"), GPU_PASS_PYTHON=sys.executable))
    rows = summary["commands"]
    ran = [row["command"] for row in rows if row["exit"] == 0]
    assert ran == [s["command"] for s in seen]
    skipped = [row for row in rows if row["exit"] is None]
    assert [row["command"] for row in skipped] == [c for c in estimates if "bench_e2e.py" in c]
    assert skipped[0]["note"].startswith(f"skipped: needs ~{estimates[skipped[0]['command']]}s")
    assert not summary["passed"] and summary["budget_s"] == 140


def test_a_failed_preflight_stops_the_part_at_once(tmp_path):
    summary, seen = _first_look(tmp_path, _fake_runner(tmp_path, fail="preflight.py"))
    assert len(seen) == 1 and "preflight.py" in seen[0]["command"]
    first, *rest = summary["commands"]
    assert first["exit"] == 1 and first["note"].startswith("preflight failed")
    assert rest and all(row["exit"] is None and row["note"].startswith("not run: the preflight failed") for row in rest)


def test_without_git_the_commit_is_the_one_prepare_recorded(tmp_path):
    # The device copy may have no .git: the script then takes the commit from the prepared file it carries,
    # and copies that file (plan's prediction) beside the measurements.
    copy = tmp_path / "tree"
    (copy / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(SCRIPT, copy / "benchmarks" / "gpu_pass.sh")
    prepared = {"commit": "feedbeef", "uncommitted_changes": False, "plan": {"peak": {"allocated_bytes": 1}}}
    (copy / "benchmarks" / "results" / "gpu_pass_prepared.json").write_text(json.dumps(prepared))
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "LOWMEM_SDPO_COMMIT", "GPU_PASS_PART_SECONDS")}
    env |= {"OUT": str(out), "GPU_PASS_RUNNER": _fake_runner(tmp_path), "GPU_PASS_PYTHON": sys.executable,
            "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    result = subprocess.run(["bash", str(copy / "benchmarks" / "gpu_pass.sh"), "first-look"], cwd=copy, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "gpu_pass_first-look.json").read_text())["commit"] == "feedbeef"
    assert json.loads((out / "gpu_pass_prepared.json").read_text()) == prepared


def test_prepare_plans_first_look_on_the_cpu(tmp_path):
    # --prepare writes plan's prediction for first-look's shape (SOLAR at FIRST_LOOK_LAYERS layers) and the commit.
    prepared = REPO / "benchmarks" / "results" / "gpu_pass_prepared.json"
    before = prepared.read_bytes() if prepared.exists() else None
    try:
        result = _script("first-look", "--prepare", env={"GPU_PASS_PYTHON": sys.executable})
        assert result.returncode == 0, result.stderr
        data = json.loads(prepared.read_text())
    finally:  # leave the tree as it was
        if before is None:
            prepared.unlink(missing_ok=True)
        else:
            prepared.write_bytes(before)
    (layers,) = re.findall(r"^FIRST_LOOK_LAYERS=(\d+)$", SCRIPT.read_text(), flags=re.MULTILINE)
    config = json.loads((REPO / "tests" / "fixtures" / "solar-10.7b" / "config.json").read_text())
    assert data["plan"]["shapes"]["layers"] == int(layers) < config["num_hidden_layers"]
    assert data["plan"]["shapes"]["hidden"] == config["hidden_size"]
    assert data["plan"]["settings"]["max_length"] == 2048 and data["shape"] == f"solar-2048-l{layers}"
    assert data["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True).stdout.strip()
