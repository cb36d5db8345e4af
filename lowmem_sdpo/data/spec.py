"""`--steps`: one comma-separated item per sDPO step, in training order.

An item is `SOURCE[:SPLIT][@K[:by=COLUMN]]`:
  SOURCE  an alias (`lowmem-sdpo data aliases`), a hub id `Org/name`, a local dataset directory, or a local
          .jsonl / .json / .parquet / .csv file;
  :SPLIT  which split of the source (default: the alias's split, else `train`; a local file has only `train`);
  @K      divides the rows of that split into K steps (seeded random, equal sizes +-1), disjoint and covering
          every row; `:by=COLUMN` stratifies instead, so each step gets the same mix of COLUMN's values.
The split is chosen first, then divided: `ultrafeedback@2` = train_prefs in two halves,
`Org/ds:test@3:by=source` = the test split in three parts with equal `source` proportions.
An item naming an existing path is always taken as that path, even when it contains ':' or '@'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lowmem_sdpo.data.aliases import DATASET_ALIASES
from lowmem_sdpo.errors import InputError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DEFAULT_SPLIT = "train"

_ITEM = re.compile(r"^(?P<source>[^:@]+)(?::(?P<split>[^:@]+))?(?:@(?P<k>[^:@]*)(?::(?P<option>[^:@]*))?)?$")


@dataclass(frozen=True)
class StepItem:
    text: str  # the item as the user wrote it
    kind: str  # "file" (a local file), "dir" (a local dataset directory) or "hub"
    location: str  # the path or hub id
    split: str | None  # None = the default for that source
    parts: int = 1
    by: str | None = None  # stratification column
    flag: str = "--steps"  # the option the user wrote it in (--steps, --eval-steps, --data), for errors

    @property
    def effective_split(self) -> str:
        return self.split or DEFAULT_SPLIT


def _classify(source: str, split: str | None, text: str, flag: str) -> tuple[str, str, str | None]:
    """(kind, location, split) for one source name."""
    path = Path(source)
    if path.is_file():
        return "file", source, split
    if path.is_dir():
        return "dir", source, split
    if source.lower().endswith(LOCAL_SUFFIXES):
        raise InputError(f"{flag} item '{text}': file {source} does not exist")
    alias = DATASET_ALIASES.get(source)
    if alias:
        return "hub", alias.hub_id, split or alias.split
    if "/" in source and not source.startswith((".", "/")):
        return "hub", source, split
    known = ", ".join(DATASET_ALIASES)
    raise InputError(
        f"{flag} item '{text}': '{source}' is not a known alias ({known}), an existing file or directory, "
        f"or a hub id Org/name"
    )


def parse_item(text: str, flag: str = "--steps") -> StepItem:
    text = text.strip()
    if Path(text).exists():  # an existing path wins over the grammar
        kind, location, split = _classify(text, None, text, flag)
        return StepItem(text, kind, location, split, flag=flag)
    match = _ITEM.match(text)
    if not match:
        raise InputError(
            f"{flag} item '{text}': expected SOURCE[:SPLIT][@K[:by=COLUMN]], e.g. ultrafeedback@2:by=source"
        )
    parts, by = 1, None
    if match["k"] is not None:
        try:
            parts = int(match["k"])
        except ValueError:
            parts = 0
        if parts < 1:
            raise InputError(f"{flag} item '{text}': @K needs a whole number K >= 1, got '{match['k']}'")
    if match["option"] is not None:
        key, _, column = match["option"].partition("=")
        if key != "by" or not column:
            raise InputError(f"{flag} item '{text}': after @K only ':by=COLUMN' is understood")
        by = column
    kind, location, split = _classify(match["source"], match["split"], text, flag)
    return StepItem(text, kind, location, split, parts, by, flag)


def parse_steps(spec: str, flag: str = "--steps") -> list[StepItem]:
    """The items of `spec`; `flag` is the option it came from, named in every error."""
    items = spec.split(",")
    for position, item in enumerate(items, start=1):
        if not item.strip():
            raise InputError(f"{flag} '{spec}': item {position} is empty (expected A,B,...)")
    return [parse_item(item, flag) for item in items]
