"""Byte sizes as people type them (`24GiB`, `24GB`, `12000MiB`) and as the plan prints them."""

from __future__ import annotations

import re

from lowmem_sdpo.errors import InputError

# Decimal units are powers of 1000, binary ones powers of 1024; a bare K/M/G/T means the binary unit, as in
# PyTorch's and nvidia-smi's figures (a "24G" card is 24 GiB).
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*$")
GIB = 2**30
MIB = 2**20


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """'24GiB' -> 25769803776. A unit is required: a bare number could mean bytes or GiB."""
    match = SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in UNITS:
        raise InputError(f"{flag} {text!r}: expected a size with a unit, such as 24GiB, 24GB or 12000MiB")
    value = int(float(match.group(1)) * UNITS[unit])
    if value <= 0:
        raise InputError(f"{flag} {text!r}: must be more than zero")
    return value


def gib(n_bytes: int | float) -> str:
    """Bytes as GiB with two decimals (the table's unit)."""
    return f"{n_bytes / GIB:.2f}"


def human(n_bytes: int | float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (for notes and advice)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{int(n_bytes)} B"
