"""lm-evaluation-harness on a run's model (`eval --lm-eval TASKS`): `lm_eval.simple_evaluate` with an `HFLM`
over M_t in 4 bit with the run's adapters active (its frozen delta's hooks are part of the forward), or over
an exported checkpoint.

`num_fewshot` applies to every task of one simple_evaluate call, so tasks are grouped by shot count and each
group is one call. The `h4` preset is the sDPO paper's (and the Open LLM Leaderboard v1's) H4 set; lm_eval
0.4.x's prompts and normalisations differ from the leaderboard's pinned harness, so its numbers are close to,
not the same as, the leaderboard's.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lowmem_sdpo.errors import InputError


@dataclass(frozen=True)
class HarnessTask:
    name: str
    num_fewshot: int | None  # None: the task's own default
    metric: str | None = None  # the figure a preset reports; None: every figure the task gives


PRESETS: dict[str, tuple[HarnessTask, ...]] = {
    "h4": (
        HarnessTask("arc_challenge", 25, "acc_norm"),
        HarnessTask("hellaswag", 10, "acc_norm"),
        HarnessTask("mmlu", 5, "acc"),
        HarnessTask("truthfulqa_mc2", 0, "acc"),
    ),
}


def parse_tasks(text: str, num_fewshot: int | None) -> tuple[str, tuple[HarnessTask, ...]]:
    """(a name for the result file, the tasks) of `--lm-eval`: a preset name, or comma-separated task names
    (each with --num-fewshot, or its own default)."""
    text = text.strip()
    if text in PRESETS:
        if num_fewshot is not None:
            raise InputError(f"--lm-eval {text}: a preset fixes each task's shots; drop --num-fewshot")
        return text, PRESETS[text]
    names = [n.strip() for n in text.split(",")]
    if not text or not all(names):
        raise InputError(f"--lm-eval '{text}': expected a preset ({', '.join(PRESETS)}) or task names A,B,...")
    return "+".join(names), tuple(HarnessTask(n, num_fewshot) for n in names)


def calls(tasks: Sequence[HarnessTask]) -> list[tuple[int | None, list[str]]]:
    """[(num_fewshot, task names)]: one simple_evaluate call per shot count, in the order shots first appear."""
    grouped: dict[int | None, list[str]] = {}
    for task in tasks:
        grouped.setdefault(task.num_fewshot, []).append(task.name)
    return list(grouped.items())


def harness_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError as err:
        raise InputError(
            "--lm-eval needs lm-evaluation-harness: pip install 'lowmem-sdpo[eval]' (lm_eval with its HF backend)"
        ) from err


def task_manager(include: str | None, include_only: bool) -> Any:
    from lm_eval.tasks import TaskManager

    if include_only and not include:
        raise InputError("--lm-eval-include-only needs --lm-eval-include DIR")
    return TaskManager(include_path=include, include_defaults=not include_only)


def check_tasks(tasks: Sequence[HarnessTask], manager: Any) -> None:
    """Every task name is one the harness (or --lm-eval-include) knows: looked up before any model loads."""
    known = set(manager.all_tasks)
    unknown = [t.name for t in tasks if t.name not in known]
    if unknown:
        raise InputError(
            f"--lm-eval: unknown task(s) {', '.join(unknown)} (lm_eval {harness_version()}; "
            "add your own task YAMLs with --lm-eval-include DIR)"
        )


def run_harness(
    lm: Any,
    tasks: Sequence[HarnessTask],
    *,
    manager: Any,
    limit: int | None,
    log_samples: bool,
) -> dict[str, Any]:
    """The harness's results of every call, and the preset's figure per task (where the task names one)."""
    import lm_eval

    check_tasks(tasks, manager)
    runs = []
    for shots, names in calls(tasks):
        result = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=shots, task_manager=manager, limit=limit, log_samples=log_samples
        )
        if result is None:  # only on non-zero ranks of a distributed run, which this is not
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        kept = {k: result.get(k) for k in ("results", "groups", "n-shot", "versions", "n-samples", "configs")}
        if log_samples:
            kept["samples"] = result.get("samples")
        runs.append({"num_fewshot": shots, "tasks": names, **kept})
    scores = {}
    for task in tasks:
        if task.metric is None:
            continue
        for run in runs:
            figures = (run.get("results") or {}).get(task.name) or (run.get("groups") or {}).get(task.name)
            if figures and f"{task.metric},none" in figures:
                scores[task.name] = {"metric": task.metric, "num_fewshot": task.num_fewshot,
                                     "value": figures[f"{task.metric},none"]}
    average = sum(s["value"] for s in scores.values()) / len(scores) if scores else None
    return {"lm_eval_version": harness_version(), "calls": runs, "scores": scores, "average": average}


def hflm(model: Any, tokenizer: Any, *, device: str, batch_size: int | str, dtype: str) -> Any:
    """An HFLM over a loaded model (our 4-bit M_t) or a checkpoint directory (an exported M_t)."""
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, str):
        return HFLM(pretrained=model, device=device, batch_size=batch_size, dtype=dtype)
    return HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
