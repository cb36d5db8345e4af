"""load_steps: the `--steps` string -> one normalised StepData per sDPO step."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from lowmem_sdpo.data.schemas import (
    MAPPABLE_COLUMNS,
    Drop,
    NormaliseOptions,
    RowError,
    Schema,
    describe_schemas,
    detect_schema,
)
from lowmem_sdpo.data.sources import RawSource, Row, read_source
from lowmem_sdpo.data.spec import StepItem, parse_steps
from lowmem_sdpo.data.splitting import random_parts, stratified_parts
from lowmem_sdpo.data.types import PreferencePair, StepData, UnpairedExample
from lowmem_sdpo.errors import InputError


def parse_columns(text: str | None) -> dict[str, str] | None:
    """`prompt=question,chosen=good,rejected=bad` -> {"prompt": "question", ...} (schema name -> yours)."""
    if not text:
        return None
    mapping: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise InputError(f"--columns item '{item}': expected NAME=COLUMN, e.g. prompt=question")
        mapping[key] = value
    return mapping


def _check_mapping(columns: Mapping[str, str]) -> None:
    unknown = [k for k in columns if k not in MAPPABLE_COLUMNS]
    if unknown:
        raise InputError(
            f"--columns: unknown name '{unknown[0]}' (expected some of: {', '.join(MAPPABLE_COLUMNS)})"
        )


def _apply_mapping(source: RawSource, columns: Mapping[str, str] | None) -> tuple[list[Row], set[str], bool]:
    """Rename the user's columns to the schema names when this source has them all.

    A source with none of them is left alone (the mapping is meant for another step of the same run); a
    source with only some of them is an error, since half a mapping is surely a typo.
    """
    present = set(source.columns)
    if not columns:
        return source.rows, present, False
    wanted = set(columns.values())
    if not wanted & present:
        return source.rows, present, False
    missing = sorted(wanted - present)
    if missing:
        raise InputError(
            f"{source.name}: --columns names column '{missing[0]}', which is not there "
            f"(columns found: {', '.join(source.columns)})"
        )
    renamed_away = wanted - set(columns)
    rows = []
    for row in source.rows:
        new = {k: v for k, v in row.items() if k not in renamed_away}
        new.update({name: row.get(column) for name, column in columns.items()})
        rows.append(new)
    return rows, (present - renamed_away) | set(columns), True


def _schema_for(source: RawSource, rows: list[Row], present: set[str]) -> Schema:
    schema = detect_schema(present, rows[0])
    if schema is None:
        raise InputError(
            f"{source.name}: required columns missing; columns found: {', '.join(source.columns)}; "
            f"known schemas: {describe_schemas()}; map other names with --columns prompt=...,chosen=...,rejected=..."
        )
    return schema


def _parts(item: StepItem, source: RawSource, seed: int) -> list[list[int]]:
    n = len(source.rows)
    if item.parts > n:
        raise InputError(
            f"{item.flag} item '{item.text}': {item.parts} parts but {source.name} has only {n} rows"
        )
    if item.by is None:
        return random_parts(n, item.parts, seed)
    if item.by not in source.columns:
        raise InputError(
            f"{item.flag} item '{item.text}': no column '{item.by}' to stratify by in {source.name} "
            f"(columns found: {', '.join(source.columns)})"
        )
    return stratified_parts([row.get(item.by) for row in source.rows], item.parts, seed)


def _normalise_part(
    source: RawSource, rows: list[Row], indices: list[int], schema: Schema, options: NormaliseOptions
) -> tuple[list[PreferencePair], list[UnpairedExample], dict[str, int]]:
    pairs: list[PreferencePair] = []
    unpaired: list[UnpairedExample] = []
    drops: Counter[str] = Counter()
    for index in indices:
        try:
            example = schema.normalise(rows[index], options)
        except RowError as err:
            raise InputError(f"{source.name}: {source.where(index)}: {err} ({schema.name} schema)") from err
        if isinstance(example, Drop):
            drops[example.reason] += 1
        elif isinstance(example, PreferencePair):
            pairs.append(example)
        else:
            unpaired.append(example)
    return pairs, unpaired, dict(sorted(drops.items()))


def load_steps(
    spec: str,
    *,
    columns: dict[str, str] | None = None,
    seed: int = 0,
    desirable_threshold: float = 3,
    flag: str = "--steps",
) -> list[StepData]:
    """Every step of `spec` loaded and normalised; all input is checked before anything is returned.

    columns: schema name -> your column (see parse_columns); seed: for `@K` splits;
    desirable_threshold: HelpSteer rows with helpfulness >= this are desirable; flag: the option `spec` came
    from (--steps, --eval-steps, --data), named in errors.
    """
    if columns:
        _check_mapping(columns)
    options = NormaliseOptions(desirable_threshold=desirable_threshold)
    steps: list[StepData] = []
    for item in parse_steps(spec, flag):
        source = read_source(item)
        rows, present, mapped = _apply_mapping(source, columns)
        schema = _schema_for(source, rows, present)
        schema_name = f"{schema.name}+columns" if mapped else schema.name
        parts = _parts(item, source, seed)
        for j, indices in enumerate(parts, start=1):
            pairs, unpaired, drops = _normalise_part(source, rows, indices, schema, options)
            label = item.text if len(parts) == 1 else f"{item.text} [{j}/{len(parts)}]"
            steps.append(StepData(label, source.name, schema_name, pairs, unpaired, len(indices), drops))
    return steps
