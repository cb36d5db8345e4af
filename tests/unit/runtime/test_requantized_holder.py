"""--reference requantized: the trained P_{t-1} for the drift sample is built on the model step t-1 trained on, still
loaded, instead of loading and quantising quantise(S + chain[:-1]) again. Checked against fresh loads: the same
logits bit for bit, after a LoRA was trained on that model and taken off, and fewer loads."""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_sdpo.models import QuantSettings, add_lora, resolve_model
from lowmem_sdpo.runtime.materialise import RequantizedHolder, load_for, unwrap_policy
from tests.support.engine_fixtures import run, small_config

CPU = torch.device("cpu")
QUANT = QuantSettings(compute_dtype="float32")


def _counting_holder(model_dir: Path) -> tuple[RequantizedHolder, list[tuple[str, ...]]]:
    load = load_for(model_dir, QUANT, CPU, None)
    loads: list[tuple[str, ...]] = []

    def loader(chain, merge):
        loads.append(tuple(Path(p).parent.name for p in chain))
        return load(chain, merge)

    return RequantizedHolder(loader, "exact", QUANT, CPU), loads


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _train_a_lora_on(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """What step t-1 did to its base: a LoRA added, optimiser steps that move it, the LoRA taken off."""
    policy = add_lora(model, r=4, alpha=8, dropout=0.0, seed=0)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    unwrap_policy(policy)


def test_the_drift_model_reuses_the_trained_base_and_equals_a_fresh_load(tmp_path):
    config = small_config(tmp_path, reference="requantized")
    run(config)
    out = Path(config.output_dir)
    a1, a2 = out / "step-1" / "adapter", out / "step-2" / "adapter"
    model_dir = resolve_model("tiny")
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))

    holder, loads = _counting_holder(model_dir)
    base = holder.model_for([a1])  # step 2's training base, quantise(S + a1)
    _train_a_lora_on(base, ids)
    drift = holder.drift_model([a1, a2])  # step 3: P_2 = quantise(S + a1) + a2's delta
    drift_logits = _logits(drift, ids)
    assert loads == [("step-1",)]  # no second load of quantise(S + a1)
    back = _logits(holder.model_for([a1]), ids)  # the delta off again: the base itself, still no load
    assert loads == [("step-1",)]
    holder.model_for([a1, a2])  # another chain: loaded
    assert loads == [("step-1",), ("step-1", "step-2")]

    fresh, fresh_loads = _counting_holder(model_dir)
    assert torch.equal(drift_logits, _logits(fresh.drift_model([a1, a2]), ids))
    assert fresh_loads == [("step-1",)]
    fresh.release()
    assert torch.equal(back, _logits(fresh.model_for([a1]), ids))
    assert not torch.equal(back, drift_logits)  # the delta does change the model
