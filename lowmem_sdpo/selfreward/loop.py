"""`self-reward`: K iterations of generate -> judge -> pairs -> sDPO step, in one output directory.

    RUN/selfreward.json              the settings (a resumed run must match them)
    RUN/iter-t/candidates.jsonl      per prompt: the n candidates of M_{t-1}, their token counts, stop flags
    RUN/iter-t/judgements.jsonl      per candidate: the judge's outputs and their parsed scores
    RUN/iter-t/pairs.jsonl           D_t: prompt, chosen, rejected (a normal preference file) + the evidence
    RUN/iter-t/summary.json          the iteration's numbers (written last: marks the iteration done)
    RUN/sdpo/                        the sDPO run directory: step t trains on iter-t/pairs.jsonl with
                                     M_{t-1} as the reference (lowmem-sdpo export / generate --run read it)

Each phase resumes after a kill: candidates and judgements are appended batch by batch (rowlog.RowLog) and
a resumed phase computes only the rows not yet written, drawing each batch with its own fixed seed; pairs are
rebuilt from the judgements; training resumes through the engine's own checkpoints.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lowmem_sdpo.atomic import write_json, write_text
from lowmem_sdpo.checks import check_run_target
from lowmem_sdpo.data.types import Message
from lowmem_sdpo.engine import RunConfig, run_sdpo
from lowmem_sdpo.engine.config import validate
from lowmem_sdpo.engine.rundir.layout import RUN_FILE, step_dir
from lowmem_sdpo.engine.rundir.metrics import read_summary
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.models.resolve import resolve_model
from lowmem_sdpo.runtime.reporting import Reporter
from lowmem_sdpo.selfreward.generation import Completion, batch_seed, batches, sample_rows
from lowmem_sdpo.selfreward.judge import (
    Judge,
    ModelJudge,
    PythonJudge,
    judge_kind,
    load_function,
    read_rubric,
    try_python_judge,
)
from lowmem_sdpo.selfreward.loading import Sampler, open_sampler
from lowmem_sdpo.selfreward.pairs import build_pairs
from lowmem_sdpo.selfreward.prompts import read_prompts
from lowmem_sdpo.selfreward.rowlog import RowLog
from lowmem_sdpo.selfreward.scores import MAX_SCORE, mean_score
from lowmem_sdpo.selfreward.settings import SelfRewardSettings
from lowmem_sdpo.settings_record import check_settings_record

SETTINGS_FILE = "selfreward.json"
SDPO_DIR = "sdpo"
CANDIDATES = "candidates.jsonl"
JUDGEMENTS = "judgements.jsonl"
PAIRS = "pairs.jsonl"
SUMMARY = "summary.json"
# Settings that may change between a run and its resume without changing a single row.
RESUME_EXEMPT = ("quiet",)


def iteration_dir(out: Path, t: int) -> Path:
    return Path(out) / f"iter-{t}"


def _check_settings(out: Path, settings: SelfRewardSettings, train: RunConfig, resume: bool) -> None:
    record = {
        "settings": {k: v for k, v in asdict(settings).items() if k not in RESUME_EXEMPT},
        "train": {k: v for k, v in train.to_dict().items() if k not in ("steps", "output_dir", "quiet")},
    }
    check_settings_record(
        out / SETTINGS_FILE, record, what="self-reward run", resume=resume, resume_needs_record=False
    )


class SelfRewardRun:
    def __init__(self, settings: SelfRewardSettings, train: RunConfig, reporter: Reporter) -> None:
        settings.check()
        self.settings, self.reporter = settings, reporter
        self.out = Path(settings.output_dir)
        check_run_target("--output-dir", self.out)
        self.train = replace(train, model=settings.model, output_dir=str(self.out / SDPO_DIR))
        self.prompts = read_prompts(settings.prompts)
        if judge_kind(settings.judge) == "python" and settings.judge_prompt:
            raise InputError("--judge-prompt applies to model judges (self or MODEL); a python judge has no rubric")
        self.rubric = read_rubric(Path(settings.judge_prompt) if settings.judge_prompt else None)
        self.kind = judge_kind(settings.judge)
        # A python judge is imported and called once on a test pair, and a judge model is resolved, before
        # anything slow or written: a typo, a wrong signature or a raising judge fails at once.
        self.score_fn = load_function(settings.judge) if self.kind == "python" else None
        if self.score_fn is not None:
            try_python_judge(settings.judge, self.score_fn)
        if self.kind == "model":
            resolve_model(settings.judge)
        resolve_model(settings.model)  # S too: a typo or an unreachable hub id before selfreward.json is written
        self._sampler: Sampler | None = None
        self._judge_sampler: Sampler | None = None

    # -- models --------------------------------------------------------------------------------------
    def sampler(self) -> Sampler:
        if self._sampler is None:
            self._sampler = open_sampler(self.settings.model, self.train, self.reporter)
        return self._sampler

    def judge(self, t: int, chain: list[Path]) -> Judge:
        if self.kind == "python":
            assert self.score_fn is not None
            return PythonJudge(self.settings.judge, self.score_fn, self.settings.judge_samples)
        if self.kind == "self":
            s = self.sampler()
            return ModelJudge(s.model_for(chain), s.tokenizer, self.rubric, self.settings.judging(t))
        if self._judge_sampler is None:
            self._judge_sampler = open_sampler(self.settings.judge, self.train, self.reporter)
        s = self._judge_sampler
        return ModelJudge(s.model_for([]), s.tokenizer, self.rubric, self.settings.judging(t))

    def release(self) -> None:
        for s in (self._sampler, self._judge_sampler):
            if s is not None:
                s.release()
        self._sampler = self._judge_sampler = None

    # -- the run -------------------------------------------------------------------------------------
    def run(self, resume: bool) -> list[dict[str, Any]]:
        validate(replace(self.train, steps="-"))  # the training settings' own errors, before anything runs
        _check_settings(self.out, self.settings, self.train, resume)
        summaries = []
        try:
            for t in range(1, self.settings.iterations + 1):
                summaries.append(self.iteration(t))
        finally:
            self.release()
        return summaries

    def chain_before(self, t: int) -> list[Path]:
        """The adapters making M_{t-1} (none for M_0 = S)."""
        if t == 1:
            return []
        summary = read_summary(step_dir(self.out / SDPO_DIR, t - 1))
        if summary is None:
            raise InputError(f"{self.out}: iteration {t - 1} has no finished sDPO step; the run is damaged")
        return [self.out / SDPO_DIR / c for c in summary["adapter_chain"]]

    def iteration(self, t: int) -> dict[str, Any]:
        idir = iteration_dir(self.out, t)
        done = _read_json(idir / SUMMARY)
        if done is not None:
            self.reporter.note(f"iteration {t}: already done, skipped")
            return done
        chain = self.chain_before(t)
        candidates = self.generate_phase(t, idir, chain)
        judgements = self.judge_phase(t, idir, chain, candidates)
        rows, stats = self.pairs_phase(t, idir, candidates, judgements)
        self.release()  # the engine loads its own model for training: one model in memory at a time
        step = self.train_phase(t)
        summary = iteration_summary(t, candidates, judgements, rows, stats.to_dict(), step, self.kind)
        write_json(idir / SUMMARY, summary)
        self.report(summary)
        return summary

    def generate_phase(self, t: int, idir: Path, chain: list[Path]) -> RowLog:
        log = RowLog(idir / CANDIDATES, key=lambda r: r["prompt_index"])
        if len(log) < len(self.prompts):
            sampler = self.sampler()
            model = sampler.model_for(chain)

            def write(batch: list[tuple[int, list[Completion]]]) -> None:
                log.append(candidate_row(i, self.prompts[i], row) for i, row in batch)

            with self.reporter.task(f"iteration {t}: candidates of M_{t - 1}", len(self.prompts)) as advance:
                sample_rows(
                    model,
                    sampler.tokenizer,
                    self.prompts,
                    self.settings.sampling(t),
                    done=lambda i: i in log,
                    write=write,
                    advance=advance,
                )
        return log

    def judge_phase(self, t: int, idir: Path, chain: list[Path], candidates: RowLog) -> RowLog:
        log = RowLog(idir / JUDGEMENTS, key=lambda r: (r["prompt_index"], r["candidate"]))
        items = [(i, k) for i in range(len(self.prompts)) for k in range(self.settings.candidates)]
        if len(log) == len(items):
            return log
        judge = self.judge(t, chain)
        seed = self.settings.judging(t).seed
        with self.reporter.task(f"iteration {t}: judging ({self.judge_label()})", len(items)) as advance:
            for batch in batches(items, self.settings.batch_size):
                todo = [ik for ik in batch if ik not in log]
                if todo:
                    # The whole fixed batch is judged with its own seed, as an uninterrupted run would.
                    requests = [(self.prompts[i], candidates.rows[i]["candidates"][k]) for i, k in batch]
                    verdicts = judge.judge_batch(requests, batch_seed(seed, items.index(batch[0])))
                    log.append(
                        {"prompt_index": i, "candidate": k, "outputs": v.outputs, "scores": v.scores}
                        for (i, k), v in zip(batch, verdicts, strict=True)
                        if (i, k) in todo
                    )
                advance(len(batch))
        return log

    def judge_label(self) -> str:
        return {"self": "M_{t-1} with the rubric", "python": self.settings.judge}.get(
            self.kind, f"{self.settings.judge} with the rubric"
        )

    def pairs_phase(
        self, t: int, idir: Path, candidates: RowLog, judgements: RowLog
    ) -> tuple[list[dict[str, Any]], Any]:
        per_prompt = []
        for i, messages in enumerate(self.prompts):
            verdicts = [judgements.rows[(i, k)] for k in range(self.settings.candidates)]
            per_prompt.append(
                {
                    "prompt_index": i,
                    "prompt": _prompt_value(messages),
                    "candidates": candidates.rows[i]["candidates"],
                    "scores": [mean_score(v["scores"]) for v in verdicts],
                    "judgements": [
                        [{"output": o, "score": s} for o, s in zip(v["outputs"], v["scores"], strict=True)]
                        for v in verdicts
                    ],
                }
            )
        rows, stats = build_pairs(per_prompt)
        if not rows:
            raise InputError(
                f"iteration {t}: no pairs: every prompt's candidates tied or were unscored ({stats.to_dict()}); "
                f"see {idir / JUDGEMENTS}"
            )
        # Written whole (temp file + rename): D_t is a function of the judgements, rebuilt on resume.
        write_text(
            idir / PAIRS, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        )
        return rows, stats

    def train_phase(self, t: int) -> dict[str, Any]:
        sdpo = self.out / SDPO_DIR
        steps = ",".join(str(iteration_dir(self.out, k) / PAIRS) for k in range(1, t + 1))
        config = replace(self.train, steps=steps)
        validate(config)
        resume = (sdpo / RUN_FILE).is_file()
        summaries = run_sdpo(config, resume=resume, extend=resume, reporter=self.reporter)
        return summaries[t - 1]

    def report(self, summary: dict[str, Any]) -> None:
        t = summary["iteration"]
        rows = [
            ("candidates", str(summary["candidates"])),
            ("judge", summary["judge"]),
            ("judgements parsed", f"{summary['judgements_parsed']}/{summary['judgements']} ({summary['parse_rate']:.1%})"),
            ("score histogram", " ".join(f"{k}:{v}" for k, v in summary["score_histogram"].items())),
            ("pairs kept", f"{summary['pairs']} of {summary['prompts']} prompts"),
            ("mean chosen / rejected length (tokens)", f"{summary['mean_chosen_tokens']:.1f} / {summary['mean_rejected_tokens']:.1f}"),
            ("gamma_ref (M_{t-1} on D_t)", f"{summary['gamma_ref']:.3f}"),
        ]  # fmt: skip
        self.reporter.table(f"self-rewarding iteration {t}", rows)


def _prompt_value(messages: list[Message]) -> str | list[Message]:
    """D_t's prompt column: a plain string for a lone user turn (the standard schema), else the messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def candidate_row(index: int, messages: list[Message], completions: list[Completion]) -> dict[str, Any]:
    return {
        "prompt_index": index,
        "prompt": _prompt_value(messages),
        "candidates": [c.text for c in completions],
        "tokens": [c.tokens for c in completions],
        "stopped": [c.stopped for c in completions],
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def score_histogram(judgements: RowLog) -> dict[str, int]:
    """Judgements per score, rounded to the nearest point (0..5), and the unparsable ones."""
    counts: Counter[str] = Counter()
    for row in judgements.rows.values():
        for s in row["scores"]:
            counts["unparsable" if s is None else str(round(s))] += 1
    order = [str(k) for k in range(int(MAX_SCORE) + 1)] + ["unparsable"]
    return {k: counts.get(k, 0) for k in order}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def iteration_summary(
    t: int,
    candidates: RowLog,
    judgements: RowLog,
    rows: list[dict[str, Any]],
    pair_stats: dict[str, Any],
    step: dict[str, Any],
    judge_kind_name: str,
) -> dict[str, Any]:
    tokens = {(i, k): n for i, r in candidates.rows.items() for k, n in enumerate(r["tokens"])}
    all_scores = [s for r in judgements.rows.values() for s in r["scores"]]
    parsed = sum(s is not None for s in all_scores)
    stopped = [s for r in candidates.rows.values() for s in r["stopped"]]
    return {
        "iteration": t,
        "judge": judge_kind_name,
        "prompts": len(candidates.rows),
        "candidates": len(tokens),
        "stopped_at_end_of_turn": sum(stopped) / max(len(stopped), 1),
        "mean_candidate_tokens": _mean(list(tokens.values())),
        "judgements": len(all_scores),
        "judgements_parsed": parsed,
        "parse_rate": parsed / max(len(all_scores), 1),
        "score_histogram": score_histogram(judgements),
        "pairs": len(rows),
        "pair_drops": pair_stats["drops"],
        # Length drift is self-rewarding's known failure: chosen answers grow longer iteration by iteration.
        "mean_chosen_tokens": _mean([tokens[(r["prompt_index"], r["chosen_index"])] for r in rows]),
        "mean_rejected_tokens": _mean([tokens[(r["prompt_index"], r["rejected_index"])] for r in rows]),
        "mean_chosen_chars": _mean([len(r["chosen"]) for r in rows]),
        "mean_rejected_chars": _mean([len(r["rejected"]) for r in rows]),
        "mean_score_chosen": _mean([r["score_chosen"] for r in rows]),
        "mean_score_rejected": _mean([r["score_rejected"] for r in rows]),
        "gamma_ref": step["gamma_ref_mean"],
        "sdpo_step": step["step"],
        "reward_accuracy_final": step.get("reward_accuracy_final"),
    }
