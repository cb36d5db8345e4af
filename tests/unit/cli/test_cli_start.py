"""A fast, quiet start (issue 23): --help, --version and argument errors come before torch, transformers and
bitsandbytes are imported; dependency chatter stays off the terminal unless --debug; Ctrl-C at any moment is
one line and exit code 130.

"Before torch is imported" is checked by what is in sys.modules afterwards (an invariant, not a timing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "transformers", "bitsandbytes", "datasets", "peft", "triton")
ENV = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning shown, unless the CLI itself filters it

# Runs main(argv) in a fresh interpreter; prints the exit code and the heavy modules then imported.
PROBE = f"""
import sys
from lowmem_sdpo.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exit:
    rc = exit.code
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
print(f"RC={{rc}} HEAVY={{','.join(heavy)}}")
"""


def _fresh(*argv: str) -> tuple[int, list[str], str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    rc_part, heavy_part = last.split(" ")
    heavy = [m for m in heavy_part.removeprefix("HEAVY=").split(",") if m]
    return int(rc_part.removeprefix("RC=")), heavy, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("argv", "rc", "stderr_lines"),
    [
        (["--version"], 0, 0),
        (["--help"], 0, 0),
        *[([cmd, "--help"], 0, 0) for cmd in ("run", "export", "demo", "data", "losses", "plan", "eval", "report",
                                              "sft", "generate", "self-reward")],
        (["run", "--model", "tiny", "--steps", "d.jsonl", "--batch-size", "0"], 2, 1),
        (["run", "--model", "tiny", "--steps", "d.jsonl", "--learning-rate", "nan"], 2, 1),
        (["run", "--model", "tiny", "--steps", "d.jsonl", "--batch-size", "two"], 2, 1),
        (["run", "--nosuch-flag"], 2, 1),
        (["nosuch-command"], 2, 1),
        (["generate", "--model", "tiny", "--prompts", "p.txt", "--temperature", "nan"], 2, 1),
        (["sft", "--model", "tiny", "--data", "d.jsonl", "--output-dir", "o", "--epochs", "inf"], 2, 1),
    ],
)
def test_answers_before_any_heavy_import(argv, rc, stderr_lines, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, heavy, _, err = _fresh(*argv)
    assert code == rc, err
    assert heavy == [], f"{argv} imported {heavy}"
    assert len(err.strip().splitlines()) == stderr_lines, err
    assert list(tmp_path.iterdir()) == []  # and wrote nothing


# The two lines issue 22/23 name, emitted the way the libraries emit them: bitsandbytes' logger warning
# (at its import on AVX512-BF16 CPUs) and torch's autograd warning (a Python UserWarning).
CHATTER = """
import logging, sys, warnings
from lowmem_sdpo.cli import main
main(sys.argv[1:])
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
warnings.warn("bitsandbytes::gemv_4bit: an autograd kernel was not registered to the Autograd key(s)", UserWarning)
logging.getLogger("lowmem_sdpo.other").warning("a warning of our own")
"""


@pytest.mark.parametrize("debug", [False, True])
def test_dependency_chatter_only_under_debug(debug):
    argv = ["losses", "--json", *(["--debug"] if debug else [])]
    done = subprocess.run([sys.executable, "-c", CHATTER, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("gemm_4bit_forward" in done.stderr) is debug
    assert ("autograd kernel was not registered" in done.stderr) is debug
    assert "a warning of our own" in done.stderr  # only the named sources are silenced


def test_ctrl_c_during_the_heavy_imports_is_one_line_and_130(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    argv = ["data", "inspect", "--model", "tiny", "--steps", str(tmp_path / "d.jsonl")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowmem_sdpo", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    time.sleep(0.8)  # past argument parsing, inside the imports of datasets / transformers
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted"], err
