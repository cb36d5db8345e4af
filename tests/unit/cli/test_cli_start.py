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


def _ctrl_c_at(delay: float, argv: list[str]) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowmem_sdpo", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_during_the_heavy_imports_is_one_line_and_130(tmp_path):
    """At several moments, since what a Ctrl-C cuts short depends on where it lands: one landing in code an
    extension runs through PyRun_String used to end the process by the signal after our line (cli/ctrl_c.py),
    about one moment in seven on a 2-core host."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    argv = ["data", "inspect", "--model", "tiny", "--steps", str(tmp_path / "d.jsonl")]
    interrupted = 0
    for delay in (0.5, 0.65, 0.8, 0.95, 1.1, 1.25):  # past argument parsing, inside the imports
        code, err = _ctrl_c_at(delay, argv)
        if code == 0:
            continue  # the command finished before the signal arrived
        interrupted += 1
        assert (code, err.strip().splitlines()) == (130, ["interrupted"]), (delay, code, err)
    if not interrupted:
        pytest.skip("the command finished before every signal arrived")


# A Ctrl-C that an extension's initialisation turns into another error: here the import of torch catches
# the KeyboardInterrupt and raises an ImportError instead, as a C extension cut short in its init does.
CUT_SHORT = """
import os, signal, sys, time
from lowmem_sdpo.cli import main

def hook(event, args):
    if event == "import" and args[0] == "torch" and not hook.fired:
        hook.fired = True
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise ImportError("torch: initialisation cut short") from None
hook.fired = False
sys.addaudithook(hook)
print(f"RC={main(sys.argv[1:])}")
"""


@pytest.mark.parametrize("debug", [False, True])
def test_an_error_that_follows_a_ctrl_c_is_reported_as_the_interruption(tmp_path, debug):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    argv = ["data", "inspect", "--model", "tiny", "--steps", str(tmp_path / "d.jsonl"), *(["--debug"] * debug)]
    done = subprocess.run([sys.executable, "-c", CUT_SHORT, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    if debug:  # --debug shows what really happened
        assert "ImportError: torch: initialisation cut short" in done.stderr, done.stderr
        assert done.returncode == 1
    else:
        assert done.stdout.strip() == "RC=130", done.stderr
        assert done.stderr.strip().splitlines() == ["interrupted"], done.stderr


def test_an_error_without_a_ctrl_c_is_not_called_an_interruption(tmp_path):
    """The converse: the same ImportError with no Ctrl-C before it is a failure, shown as one."""
    probe = CUT_SHORT.replace("os.kill(os.getpid(), signal.SIGINT)\n            time.sleep(5)", "raise KeyboardInterrupt")
    probe = probe.replace("except KeyboardInterrupt:", "except KeyboardInterrupt:  # not a signal")
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    argv = ["data", "inspect", "--model", "tiny", "--steps", str(tmp_path / "d.jsonl")]
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "ImportError: torch: initialisation cut short" in done.stderr
    assert "interrupted" not in done.stderr
