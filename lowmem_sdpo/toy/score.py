"""Scoring S and trained adapter chains on preference pairs the training never saw (issue 18).

The model scored is what a run trains: Q(S) in 4 bit plus the adapter chain as a frozen low-rank delta (the
engine's exact holder), so S is loaded and quantised once and every arm's M_T is a swap of forward hooks.
Metrics, per pair set:
  preference_accuracy: share of pairs with log p(chosen) > log p(rejected) under the model (the evaluation
      module's ranking accuracy, lowmem_sdpo.eval.preference.ranking_figures);
  reward_accuracy: share where DPO's implicit reward, log p_model - log p_S, is higher for chosen (against S;
      undefined for S itself, where every reward is 0): lowmem_sdpo.engine.reference.heldout.preference_figures;
  exact_match: share of prompts whose greedy answer (up to EOS) is the chosen answer (the toy's own: its
      answers are short sums, so a greedy match is a meaningful check);
  gamma: the sDPO paper's gamma on these pairs, mean of log p(chosen) - log p(rejected) (ranking_figures).

The figures are the evaluation module's; what is the toy's own is the model handling (S loaded and quantised
once, shared by every run's M_T, where `eval` opens one run) and the greedy exact match.
benchmarks/bench_sdpo_vs_dpo.py uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowmem_sdpo.data import PreferencePair, StepData, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.reference.heldout import preference_figures
from lowmem_sdpo.engine.reference.logps import LogpTable, compute_logps
from lowmem_sdpo.engine.units import Unit, build_units
from lowmem_sdpo.eval.preference import ranking_figures
from lowmem_sdpo.runtime.hardware import Hardware
from lowmem_sdpo.runtime.materialise import Holder
from lowmem_sdpo.runtime.open_model import open_model
from lowmem_sdpo.runtime.reporting import Reporter
from lowmem_sdpo.toy.run_settings import TINY_TOY_RUN

# Tokenised as the runs tokenise their pairs.
MAX_LENGTH, MAX_PROMPT_LENGTH = TINY_TOY_RUN["max_length"], TINY_TOY_RUN["max_prompt_length"]
SCORE_BATCH = 64
MAX_NEW_TOKENS = 5  # a sum of two two-digit numbers has at most 3 digits, then EOS


class ToyScorer:
    """Q(S) from `model_dir`, once, on CPU; scores S + any adapter chain on a fixed list of pairs."""

    def __init__(self, model_dir: Path, rows: list[dict[str, str]]) -> None:
        self.tokenizer = load_tokenizer(str(model_dir))
        self.hw = Hardware(torch.device("cpu"), "float32")
        self.holder: Holder = open_model(model_dir, self.hw).holder  # exact, silent
        pairs = [
            PreferencePair(
                prompt=[{"role": "user", "content": r["prompt"]}], chosen=r["chosen"], rejected=r["rejected"]
            )
            for r in rows
        ]
        step = StepData(
            label="scored", source="toy", schema="standard", pairs=pairs, n_source_rows=len(pairs)
        )
        tokenized = tokenize_step(
            step, self.tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH
        )
        if len(tokenized.pairs) != len(rows):  # a dropped pair would silently change the denominator
            raise ValueError(
                f"{len(rows) - len(tokenized.pairs)} scored pairs did not fit {MAX_LENGTH} tokens"
            )
        self.units: list[Unit] = build_units(tokenized, seed=0, label="scored")[0]
        self.answers = [r["chosen"] for r in rows]
        self.base: LogpTable = self._logps([])

    def _logps(self, chain: Sequence[Path]) -> LogpTable:
        return compute_logps(
            self.holder.model_for(chain), self.units, pad_id=self.tokenizer.pad_token_id, batch_size=SCORE_BATCH,
            hw=self.hw, impl="torch", with_kl=False, reporter=Reporter(True), description="scoring",
        )  # fmt: skip

    @torch.no_grad()
    def greedy(self, chain: Sequence[Path]) -> list[str]:
        """Greedy answers, batched with left padding (position ids count real tokens only), no KV cache: the
        sequences are ~15 tokens and the answers at most MAX_NEW_TOKENS."""
        model = self.holder.model_for(chain)
        model.eval()
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        out: list[str] = []
        for start in range(0, len(self.units), SCORE_BATCH):
            prompts = [u.chosen_prompt for u in self.units[start : start + SCORE_BATCH]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            made = torch.empty(len(prompts), 0, dtype=torch.long)
            for _ in range(MAX_NEW_TOKENS):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                nxt = logits.argmax(-1, keepdim=True)
                made = torch.cat([made, nxt], dim=1)
                ids = torch.cat([ids, nxt], dim=1)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            for row in made.tolist():
                # Without EOS in MAX_NEW_TOKENS the text is 5 tokens long: longer than any answer, never a match.
                out.append(self.tokenizer.decode(row[: row.index(eos)] if eos in row else row))
        return out

    def score(self, chain: Sequence[Path]) -> dict[str, Any]:
        table = self.base if not chain else self._logps(chain)
        ranking = ranking_figures(table)
        # Which answer has the higher implicit reward does not depend on beta > 0 (both scale by it): beta 1.
        rewards = preference_figures(table, self.base, beta=1.0) if chain else None
        answers = self.greedy(chain)
        return {
            "preference_accuracy": ranking["ranking_accuracy"],
            "reward_accuracy": rewards["reward_accuracy"] if rewards is not None else None,
            "exact_match": sum(a == b for a, b in zip(answers, self.answers, strict=True)) / len(answers),
            "gamma": ranking["gamma"],
        }

    def release(self) -> None:
        self.holder.release()
