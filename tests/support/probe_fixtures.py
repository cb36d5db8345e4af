"""Helpers of the bad-input probe tests (a plain module: tests import these).

A probe is one command line a user could type, refused: it must exit with the expected code, say exactly
one line on stderr, and leave every file it was pointed at byte-identical (nothing written, changed or
deleted). `tree_digest` is what "byte-identical" is checked with: the sha256 of every file's relative path
and contents under a directory (hidden files included), plus the set of directories.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lowmem_sdpo.cli import main


def tree_digest(root: Path) -> str:
    """Contents of `root` (a file, a directory tree, or nothing) as one digest."""
    h = hashlib.sha256()
    root = Path(root)
    if root.is_file():
        h.update(b"F" + root.read_bytes())
        return h.hexdigest()
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix().encode()
        if path.is_dir():
            h.update(b"D" + rel + b"\0")
        else:
            h.update(b"F" + rel + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Probe:
    """argv with {tmp}, {run} ... placeholders; `setup` makes the files the probe is pointed at (in tmp)."""

    argv: list[str]
    rc: int = 2
    # What the one stderr line must contain (the field or file it names).
    says: str = ""
    setup: Callable[[Path], None] | None = None
    id: str = field(default="")


def run_probe(probe: Probe, tmp: Path, capsys: pytest.CaptureFixture[str], **places: Path) -> str:
    """Run `probe` in-process (the caller has made tmp the working directory); assert rc, one stderr line, and
    tmp and every place (a run, a model the probe reads) unchanged. Returns the stderr line."""
    if probe.setup is not None:
        probe.setup(tmp)
    watched = [tmp, *places.values()]
    before = [tree_digest(p) for p in watched]
    fixed = [a.format(tmp=tmp, **places) for a in probe.argv]
    capsys.readouterr()
    try:
        rc = main(fixed)
    except SystemExit as exit:  # argparse's own refusals exit rather than return
        rc = exit.code
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc == probe.rc, (fixed, out.err)
    assert len(lines) == 1, (fixed, out.err)
    assert probe.says in lines[0], (fixed, lines[0])
    for path, digest in zip(watched, before, strict=True):
        assert tree_digest(path) == digest, f"{fixed}: changed files under {path}"
    return lines[0]


def write_fake_run(root: Path, model_dir: Path, adapter: Path) -> Path:
    """A finished one-step run directory as `run` writes it (run.json, step-1/summary.json naming the adapter),
    made from a saved model and adapter rather than by training: export reads nothing else."""
    import shutil

    run = root / "run"
    (run / "step-1").mkdir(parents=True)
    shutil.copytree(adapter, run / "step-1" / "adapter")
    (run / "run.json").write_text(
        json.dumps({"config": {"model": str(model_dir)}, "data": [{}], "model_dir": str(model_dir)})
    )
    (run / "step-1" / "summary.json").write_text(json.dumps({"adapter_chain": ["step-1/adapter"]}))
    return run
