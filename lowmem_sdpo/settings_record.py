"""The settings file that guards a resumable output directory (`sft`'s sft.json, `self-reward`'s
selfreward.json): a new run writes it into an empty directory; a rerun needs --resume and the same settings,
and a refusal names every setting that differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import write_json
from lowmem_sdpo.errors import InputError


def differing_settings(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The keys whose values differ, sorted; a part that is a dict on either side is compared key by key, each
    named part.key (a whole config differing names the options that do)."""
    differ: list[str] = []
    for part in sorted(set(saved) | set(record)):
        was, now = saved.get(part), record.get(part)
        if isinstance(was, dict) or isinstance(now, dict):
            was, now = was if isinstance(was, dict) else {}, now if isinstance(now, dict) else {}
            differ += [f"{part}.{k}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        elif was != now:
            differ.append(part)
    return differ


def check_settings_record(
    path: Path, record: dict[str, Any], *, what: str, resume: bool, resume_needs_record: bool
) -> None:
    """Write `record` to `path` for a new run, or check it against the saved one. `what` names the kind of run
    ("SFT run"); `resume_needs_record`: whether --resume refuses a directory without the file (else it starts
    a new run there)."""
    out = path.parent
    if not path.is_file():
        if resume and resume_needs_record:
            raise InputError(f"--resume {out}: no {what} there (no {path.name}); drop --resume to start one")
        if out.exists() and any(out.iterdir()):
            raise InputError(f"--output-dir {out}: exists, is not empty and holds no {what} (no {path.name})")
        write_json(path, record)
        return
    if not resume:
        raise InputError(f"--output-dir {out}: already holds an earlier {what}; pass --resume to continue it")
    differ = differing_settings(json.loads(path.read_text()), record)
    if differ:
        raise InputError(f"--resume {out}: this run was made with other settings: {', '.join(differ)}")
