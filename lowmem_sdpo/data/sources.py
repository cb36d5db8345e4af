"""Reading a step's raw rows: local files by plain readers (exact line numbers in errors), local dataset
directories and hub ids through `datasets` (and its cache)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_sdpo.data.spec import DEFAULT_SPLIT, StepItem
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.hub import hub_offline, hub_reachable, unreachable

Row = dict[str, Any]


@dataclass
class RawSource:
    name: str  # how errors and reports name the source: the path, or "hub_id:split"
    rows: list[Row]
    columns: list[str]  # every column seen, in first-seen order
    line_numbers: list[int] | None = None  # JSON Lines: the file line of each row

    def where(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"line {self.line_numbers[index]}"
        return f"row {index + 1}"


def _columns(rows: list[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"{path}: line {line} has bytes that are not UTF-8 (at byte offset {err.start})"
        ) from err


def _object(path: Path, where: str, value: Any) -> Row:
    if not isinstance(value, dict):
        raise InputError(f"{path}: {where}: expected a JSON object (one row), got {type(value).__name__}")
    return value


def _read_jsonl_text(path: Path, text: str) -> tuple[list[Row], list[int]]:
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: invalid JSON at line {number}: {err.msg}") from err
        rows.append(_object(path, f"line {number}", value))
        lines.append(number)
    return rows, lines


def read_jsonl(path: Path) -> RawSource:
    rows, lines = _read_jsonl_text(path, _text(path))
    return RawSource(str(path), rows, _columns(rows), lines)


def read_json(path: Path) -> RawSource:
    """A JSON array of row objects, or (as `datasets` also accepts) JSON Lines saved as .json."""
    text = _text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one top-level value: JSON Lines
            rows, lines = _read_jsonl_text(path, text)
            return RawSource(str(path), rows, _columns(rows), lines)
        raise InputError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON array of row objects, got {type(value).__name__}")
    rows = [_object(path, f"row {i + 1}", v) for i, v in enumerate(value)]
    return RawSource(str(path), rows, _columns(rows))


def read_parquet(path: Path) -> RawSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from err
    return RawSource(str(path), table.to_pylist(), list(table.column_names))


def read_csv(path: Path) -> RawSource:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    try:
        rows = [dict(r) for r in reader]
    except csv.Error as err:
        raise InputError(f"{path}: invalid CSV at line {reader.line_num}: {err}") from err
    for i, row in enumerate(rows):
        if None in row:  # DictReader files surplus cells under the key None
            raise InputError(f"{path}: row {i + 1} has more cells than the header has columns")
    return RawSource(str(path), rows, list(reader.fieldnames or []))


FILE_READERS: dict[str, Callable[[Path], RawSource]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".parquet": read_parquet,
    ".csv": read_csv,
}


def _read_file(item: StepItem) -> RawSource:
    path = Path(item.location)
    if item.split not in (None, DEFAULT_SPLIT):
        raise InputError(
            f"{path}: no split '{item.split}' (a local file has the one split '{DEFAULT_SPLIT}')"
        )
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(
            f"{path}: unsupported file type '{path.suffix}' (expected {', '.join(FILE_READERS)})"
        )
    if not path.is_file():
        raise InputError(f"{path}: file does not exist")
    return reader(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _from_dataset(name: str, dataset: Any) -> RawSource:
    return RawSource(name, dataset.to_list(), list(dataset.column_names))


def _read_saved_dataset(path: Path, split: str) -> RawSource:
    """A directory written by Dataset(Dict).save_to_disk."""
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    name = f"{path}:{split}"
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise InputError(f"{path}: no split '{split}' (it has: {', '.join(loaded)})")
        return _from_dataset(name, loaded[split])
    if split != DEFAULT_SPLIT:
        raise InputError(f"{path}: no split '{split}' (a saved Dataset has the one split '{DEFAULT_SPLIT}')")
    return _from_dataset(name, loaded)


# What to give instead of a dataset hub id that cannot be fetched.
LOCAL_DATA_HINT = "give a local file (.jsonl, .json, .parquet, .csv) or dataset directory instead"


def _load_dataset(location: str, split: str) -> RawSource:
    """A hub id or a directory of data files, through a `datasets` builder (what load_dataset does; downloads
    are cached), asked for its split names first."""
    import datasets

    path = Path(location)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved_dataset(path, split)
    hub_id = not path.is_dir()
    if hub_id and not hub_offline() and not hub_reachable():
        # datasets would retry for most of a minute; with HF_HUB_OFFLINE=1 it reads its cache instead.
        raise unreachable(f"dataset '{location}'", f"{LOCAL_DATA_HINT}, or set HF_HUB_OFFLINE=1 to read the cache")
    try:
        # The builder knows the split names before anything is downloaded: a wrong split fails fast.
        builder = datasets.load_dataset_builder(location)
        available = [str(s) for s in (builder.config.data_files or builder.info.splits or {})]
        if available and split not in available:
            raise InputError(f"{location}: no split '{split}' (it has: {', '.join(sorted(available))})")
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split)
    except InputError:
        raise
    except Exception as err:  # network, missing repo, gated access, bad files: all reach the user as one line
        if hub_id and hub_offline():
            raise unreachable(f"dataset '{location}'", LOCAL_DATA_HINT) from err
        raise InputError(f"cannot load dataset '{location}' split '{split}': {_first_line(err)}") from err
    return _from_dataset(f"{location}:{split}", dataset)


def read_source(item: StepItem) -> RawSource:
    source = _read_file(item) if item.kind == "file" else _load_dataset(item.location, item.effective_split)
    if not source.rows:
        raise InputError(f"{source.name}: is empty (no rows)")
    return source
