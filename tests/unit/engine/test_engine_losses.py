"""Every objective through `lowmem-sdpo run`, unpaired steps, and AOT's sort spanning the whole window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_sdpo.cli import main
from lowmem_sdpo.data import load_steps, load_tokenizer, tokenize_step
from lowmem_sdpo.engine.training.objective import Objective
from lowmem_sdpo.engine.training.trainer import StepJob
from lowmem_sdpo.engine.units import build_units
from lowmem_sdpo.losses import LOSSES
from lowmem_sdpo.models import QuantSettings, load_quantized, resolve_model
from lowmem_sdpo.runtime.hardware import Hardware
from tests.support.engine_fixtures import reference_table, toy_slice, unpaired_toy
from tests.support.window_fixtures import accumulated_grads, window_job, window_setup

CPU = Hardware(torch.device("cpu"), "float32")


def _run_cli(tmp: Path, steps: str, loss: str, *extra: str) -> dict:
    out = tmp / f"run-{loss}"
    args = [
        "run",
        "--model",
        "tiny",
        "--steps",
        steps,
        "--output-dir",
        str(out),
        "--loss",
        loss,
        "--max-length",
        "32",
        "--max-prompt-length",
        "24",
        "--beta",
        "0.5",
        "--learning-rate",
        "3e-3",
        "--batch-size",
        "8",
        "--grad-accum",
        "1",
        "--epochs",
        "2",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lora-dropout",
        "0",
        "--device",
        "cpu",
        "--no-gradient-checkpointing",
        "--quiet",
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "step-1" / "summary.json").read_text())


# DPOP's default lambda = 50 (Smaug's 7B-70B setting) makes any dip of a 2-token chosen answer cost 50x its
# size here, and 12 optimiser steps of a 2-layer model spend themselves on that penalty; 1 keeps its shape.
# AOT matches the sorted distribution of log-ratios, not each pair: at 3e-3 its per-pair accuracy over 8-pair
# batches is still noise after 12 steps (0.56-0.69 either way); 6e-3 gives it the room to show.
LOSS_FLAGS: dict[str, tuple[str, ...]] = {
    "dpop": ("--dpop-lambda", "1"),
    "aot": ("--learning-rate", "6e-3"),
}


def _accuracy_on_all_pairs(data: Path, adapter: Path) -> tuple[float, float]:
    """(implicit-reward accuracy, mean margin in nats) of the trained adapter over every training pair, against
    S: the claim "the policy moved toward the chosen answers", on all 48 pairs rather than on the metrics'
    8-pair batches (whose accuracy is a noisy multiple of 1/8)."""
    from peft import PeftModel

    model_dir = resolve_model("tiny")
    tokenizer = load_tokenizer(str(model_dir))
    units, _ = build_units(
        tokenize_step(load_steps(str(data))[0], tokenizer, max_length=32, max_prompt_length=24),
        seed=0,
        label="x",
    )
    base = reference_table(
        load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32")), units, tokenizer.pad_token_id
    )
    policy = PeftModel.from_pretrained(
        load_quantized(model_dir, quant=QuantSettings(compute_dtype="float32")), str(adapter)
    )
    trained = reference_table(policy.eval(), units, tokenizer.pad_token_id)
    margin = (trained.chosen - base.chosen) - (trained.rejected - base.rejected)
    return float((margin > 0).float().mean()), float(margin.mean())


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_on_toy_pairs(tmp_path, loss):
    data = toy_slice(tmp_path / "pairs.jsonl", 1, 48)
    summary = _run_cli(tmp_path, str(data), loss, *LOSS_FLAGS.get(loss, ()))
    assert summary["optimizer_steps"] == 12  # 48 pairs x 2 epochs / 8
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    # The policy moved toward the chosen answers: on every training pair, against S (where every implicit
    # reward is 0 and the accuracy is 0 by definition), most margins are now positive.
    accuracy, margin = _accuracy_on_all_pairs(data, tmp_path / f"run-{loss}" / "step-1" / "adapter")
    assert accuracy > 0.5 and margin > 0, (accuracy, margin)


@pytest.mark.parametrize("loss", ["kto", "aot_unpaired"])
def test_unpaired_step_trains(tmp_path, loss):
    data = unpaired_toy(tmp_path / "unpaired.jsonl", 48)  # 48 desirable, 32 undesirable rows
    summary = _run_cli(tmp_path, str(data), loss)
    assert summary["kind"] == "unpaired"
    assert summary["pairs_used"] == 48  # the undesirable minority is cycled to balance every batch
    assert summary["reward_margin_final"] > 0, summary


@pytest.mark.parametrize(
    ("loss", "options"),
    [
        ("aot", {}),
        ("aot_unpaired", {}),
        ("aot", {"aot_sort": "soft", "aot_temperature": 0.05}),
        ("aot", {"aot_cost": "hinge2"}),
    ],
)
def test_aot_window_gradients_equal_one_big_batch(tmp_path, loss, options):
    setup = window_setup(tmp_path)
    policy, job = setup[3], window_job(tmp_path, setup, Objective(loss, 0.5, options))
    big = accumulated_grads(policy, job, [list(range(8))])[0]
    split = accumulated_grads(policy, job, [[0, 1], [2, 3, 4], [5], [6, 7]])[0]
    for name in big:
        # Equal up to float32 summation order (the micro-batches pad to different lengths).
        scale = big[name].abs().max()
        assert (split[name] - big[name]).abs().max() <= 1e-5 * scale + 1e-8, name
    assert any(g.abs().sum() > 0 for g in big.values())
    # Sorting only inside each micro-batch (what per-micro-batch losses do) gives other gradients.
    naive = {n: torch.zeros_like(g) for n, g in big.items()}
    for mb in ([0, 1], [2, 3, 4], [5], [6, 7]):
        part = accumulated_grads(policy, job, [mb])[0]
        for n in naive:
            naive[n] += part[n] * len(mb) / 8
    assert (
        max(float((naive[n] - big[n]).abs().max() / big[n].abs().max().clamp(min=1e-12)) for n in big) > 1e-2
    )


def _one_graph_grads(policy, job: StepJob, micro: list[list[int]]) -> dict[str, torch.Tensor]:
    """The window loss differentiated directly: every micro-batch's forward kept in one autograd graph, the
    RNG stream drawn in the same order as a window's micro-batches draw it (so the same dropout masks)."""
    from lowmem_sdpo.engine.training.objective import LogpBatch
    from lowmem_sdpo.engine.training.trainer import _logp_batch, _units_logps

    policy.zero_grad(set_to_none=True)
    policy.train()
    parts = []
    for mb in micro:
        logp, n, _ = _units_logps(policy, job, mb)
        parts.append(_logp_batch(job, mb, logp, n, None))
    whole = LogpBatch(
        *(
            torch.cat([getattr(p, f) for p in parts])
            for f in (
                "policy_chosen",
                "policy_rejected",
                "ref_chosen",
                "ref_rejected",
                "chosen_tokens",
                "rejected_tokens",
            )
        )
    )
    losses, _, _ = job.objective(whole)
    losses.mean().backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_aot_window_exact_with_dropout(tmp_path, loss):
    """With LoRA dropout 0.05 (the default) the ranking pass and the gradient pass see the same masks: the
    window's gradient is the exact gradient of the window loss under those masks."""
    setup = window_setup(tmp_path, dropout=0.05)
    policy, job = setup[3], window_job(tmp_path, setup, Objective(loss, 0.5, {}))
    micro = [[0, 1], [2, 3, 4], [5], [6, 7]]
    torch.manual_seed(7)
    ours = accumulated_grads(policy, job, micro)[0]
    after_ours = torch.get_rng_state()
    torch.manual_seed(7)
    exact = _one_graph_grads(policy, job, micro)
    assert torch.equal(after_ours, torch.get_rng_state())  # one window draws the stream once
    for name in exact:
        scale = exact[name].abs().max()
        assert (ours[name] - exact[name]).abs().max() <= 1e-5 * scale + 1e-8, name
    # Dropout is live: another stream gives other gradients.
    torch.manual_seed(8)
    other = accumulated_grads(policy, job, micro)[0]
    assert max(float((other[n] - exact[n]).abs().max() / exact[n].abs().max()) for n in exact) > 1e-3
