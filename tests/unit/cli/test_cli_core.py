"""The CLI shell: help, version, `python -m`, and one-line errors with exit code 2."""

import subprocess
import sys

from lowmem_sdpo.cli import main
from lowmem_sdpo.errors import InputError


def test_python_m_entry_point_prints_help():
    out = subprocess.run(
        [sys.executable, "-m", "lowmem_sdpo", "--help"], capture_output=True, text=True, check=True
    )
    assert "lowmem-sdpo" in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_input_error_is_one_line():
    err = InputError("file a.jsonl line 3:\n expected a string")
    assert "\n" not in str(err)
    assert str(err) == "file a.jsonl line 3:  expected a string"
