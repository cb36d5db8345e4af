"""The input checks every command shares: numbers (finite, in range, of the right type) and output paths
(of the right kind, never something the user made).

Everything here is torch-free, so a command runs all of it before the first heavy import and a refused start
writes nothing. Each check raises InputError with one line naming the flag (or config key) and what was
expected.

Output directories that a command replaces as a whole (`export --out`, `report --out`) are recognised as
ours by a marker file written into them; anything else at that path -- a user's directory, a run, a data
file -- is refused, never deleted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lowmem_sdpo.errors import InputError

# Written into every directory a command replaces whole; its "kind" names the command that made it.
OUTPUT_MARKER = ".lowmem-sdpo-output.json"


# -- numbers -------------------------------------------------------------------------------------------


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    note: str = "",
) -> None:
    """`value` is a finite number (an int when `integer`) within [low, high] (an end excluded when open);
    None means unbounded. NaN and inf are refused by name: a NaN passes every `x <= 0` test."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InputError(f"{name}: expected {kind}, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise InputError(f"{name} must be {describe_range(low, high, low_open, high_open)}{note}, got {value}")


def describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        if low == 0:
            return "positive" if low_open else "at least 0"
        return f"greater than {low:g}" if low_open else f"at least {low:g}"
    if high is not None:
        return f"less than {high:g}" if high_open else f"at most {high:g}"
    return "a finite number"


def check_type(name: str, value: Any, default: Any) -> None:
    """A config value (YAML, or a caller's) of the type its default has: `epochs: "lots"` is refused here, not
    deep inside training. Ints are accepted where floats are expected; None only where the default is None."""
    if default is None:
        if value is not None and not isinstance(value, str):
            raise InputError(f"{name}: expected a string, got {value!r}")
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        kind = "a number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        kind = "a string"
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
        kind = "a mapping"
    else:
        return
    if not ok:
        raise InputError(f"{name}: expected {kind}, got {value!r}")


# -- paths ---------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_creatable(name: str, path: Path) -> None:
    """`path` can be created: the nearest existing ancestor is a writable directory (not a file)."""
    base = _nearest_existing(Path(path).absolute().parent)
    if not base.is_dir():
        raise InputError(f"{name} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{name} {path}: cannot write there ({base} is not writable)")


def _holds_cwd(path: Path) -> bool:
    here, target = Path.cwd().resolve(), path.resolve()
    return target == here or target in here.parents


def read_marker(path: Path) -> str | None:
    """The kind of output `path` holds by its marker, or None (no marker, or not ours)."""
    marker = Path(path) / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def write_marker(directory: Path, kind: str) -> None:
    """Mark `directory` (usually the temp directory about to be renamed into place) as this command's output."""
    (Path(directory) / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def check_replaceable_dir(name: str, path: Path, kind: str, *, keep: tuple[Path, ...] = ()) -> None:
    """`path` may be written as a whole directory by the command that makes `kind` outputs: it does not exist,
    or it is an empty directory, or it holds an earlier output of the same kind (its marker says so). Anything
    else is refused, so a user's files are never replaced. `keep` are inputs of the command (a run, a model)
    that the output must neither be nor contain."""
    path = Path(path)
    if _holds_cwd(path):
        raise InputError(f"{name} {path}: is the current directory (or holds it); name a new directory")
    for source in keep:
        source = Path(source)
        if source.exists() and (path.resolve() == source.resolve() or path.resolve() in source.resolve().parents):
            raise InputError(f"{name} {path}: would replace {source}, an input of this command; name a new directory")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InputError(f"{name} {path}: exists and is not a directory; name a new directory")
    if not path.exists():
        check_creatable(name, path)
        return
    if not any(path.iterdir()):
        return
    found = read_marker(path)
    if found != kind:
        what = f"holds a {found} output" if found else f"is not an earlier {kind} output (no {OUTPUT_MARKER})"
        raise InputError(f"{name} {path}: exists and {what}; it is left as it is, name a new directory")
    if not os.access(path.parent.absolute(), os.W_OK | os.X_OK):
        raise InputError(f"{name} {path}: cannot replace it ({path.parent} is not writable)")


def check_output_file(name: str, path: Path) -> None:
    """`path` can be written as a file: not a directory, and its parent can be created."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{name} {path}: is a directory; name a file")
    if not path.exists():
        check_creatable(name, path)


def check_run_target(name: str, path: Path) -> None:
    """`path` can be (or already is) a run directory: not a file, and creatable under a writable directory.
    What it may already hold is the command's own check (its settings file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{name} {path}: exists and is a file, not a directory")
    if not path.exists():
        check_creatable(name, path)


def check_input_file(name: str, path: Path) -> None:
    """`path` is an existing regular file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{name} {path}: is a directory, expected a file")
    if not path.is_file():
        raise InputError(f"{name} {path}: no such file")
