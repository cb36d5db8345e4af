"""A whole small sDPO run: layout of the run directory, the ln 2 invariant, what summary.json holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_sdpo.host import NUMERIC_CPU_FLAGS
from tests.support.engine_fixtures import adapter_tensors, run, small_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    config = small_config(tmp, diagnostics=True)
    return config, run(config)


def test_first_loss_is_ln2_at_every_step(finished):
    # A fresh LoRA (B = 0) changes nothing, so the policy equals the reference M_{t-1}: every h = 0 and the
    # DPO loss -log sigmoid(0) = ln 2 = 0.693147...
    _, summaries = finished
    assert len(summaries) == 2
    for s in summaries:
        assert abs(s["first_loss"] - math.log(2)) < 1e-2, s


def test_run_directory_layout(finished):
    config, summaries = finished
    out = Path(config.output_dir)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["steps"] == config.steps
    assert len(run_json["data"]) == 2 and all(len(d["fingerprint"]) == 64 for d in run_json["data"])
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(run_json["versions"])
    host = run_json["host"]  # what the numbers can depend on (lowmem_sdpo/host.py)
    assert host["libraries"]["bitsandbytes"] == run_json["versions"]["bitsandbytes"]
    assert set(host["cpu_flags"]) == set(NUMERIC_CPU_FLAGS) and host["bitsandbytes_cpu_repacking"] == "off"
    for t, s in enumerate(summaries, start=1):
        step = out / f"step-{t}"
        assert (step / "adapter" / "adapter_config.json").is_file()
        assert (step / "adapter" / "adapter_model.safetensors").is_file()
        assert not (step / "checkpoint").exists()  # removed once the step is done
        lines = (step / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == s["optimizer_steps"] == 3  # 24 pairs / (4 pairs x 2 micro-batches)
        row = json.loads(lines[0])
        for key in (
            "loss",
            "rewards_chosen",
            "rewards_rejected",
            "reward_accuracy",
            "reward_margin",
            "logps_chosen",
            "logps_rejected",
            "lr",
            "tokens_per_second",
            "memory_bytes",
        ):
            assert key in row
        for key in (
            "gamma_ref_mean",
            "gamma_base_mean",
            "first_loss",
            "final_loss",
            "reward_accuracy_final",
            "reward_margin_final",
            "tokens_per_second",
            "peak_memory_bytes",
            "wall_seconds",
            "pairs_used",
        ):
            assert s[key] is not None, key
    # M_2's chain is both adapters, in order (sDPO: the target of step 2 started from M_1).
    assert summaries[1]["adapter_chain"] == ["step-1/adapter", "step-2/adapter"]


def test_gamma_ref_is_the_mean_log_ratio_of_the_cache(finished):
    config, summaries = finished
    for t, s in enumerate(summaries, start=1):
        cache = load_file(str(Path(config.output_dir) / f"step-{t}" / "reference_logps.safetensors"))
        expected = (cache["chosen"].double() - cache["rejected"].double()).mean().item()
        assert s["gamma_ref_mean"] == pytest.approx(expected, abs=1e-9)
    # Step 1's reference is S itself.
    assert summaries[0]["gamma_base_mean"] == summaries[0]["gamma_ref_mean"]


def test_adapter_loads_with_peft_and_changes_the_model(finished):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowmem_sdpo.models import resolve_model

    config, _ = finished
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny")), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7]])
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(Path(config.output_dir) / "step-1" / "adapter"))
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    assert any(
        v.abs().sum() > 0 for k, v in adapter_tensors(Path(config.output_dir), 1).items() if "lora_B" in k
    )


def test_resume_of_a_finished_run_skips_every_step(finished):
    config, summaries = finished
    out = Path(config.output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run(config, resume=True)
    assert again == summaries
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_target_init_base_starts_step_2_from_s(tmp_path):
    # The paper's Fig. 3 ablation: the target of step 2 starts from S while the reference is M_1, so the
    # first loss of step 2 is no longer ln 2, and M_2 = S + dW_2 only.
    config = small_config(tmp_path, target_init="base", learning_rate=3e-2)
    summaries = run(config)
    assert abs(summaries[0]["first_loss"] - math.log(2)) < 1e-2
    assert abs(summaries[1]["first_loss"] - math.log(2)) > 1e-3
    assert summaries[1]["adapter_chain"] == ["step-2/adapter"]


def _independent_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    """dW = (alpha / r) * B @ A from the adapter's own files (peft's documented LoRA scaling)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    return config["lora_alpha"] / config["r"] * (b @ a)


def test_export_cli_writes_s_plus_all_deltas(finished, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lowmem_sdpo.cli import main
    from lowmem_sdpo.models import resolve_model

    config, _ = finished
    run_dir = Path(config.output_dir)
    out = tmp_path / "m2"
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--quiet"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    assert exported.dtype == torch.bfloat16
    base = load_file(str(resolve_model("tiny") / "model.safetensors"))
    module = "model.layers.1.mlp.down_proj"
    expected = base[f"{module}.weight"].double()
    for t in (1, 2):
        expected = expected + _independent_delta(run_dir / f"step-{t}" / "adapter", module)
    got = dict(exported.named_parameters())[f"{module}.weight"]
    assert torch.equal(got, expected.to(torch.bfloat16))
    # Untouched tensors are S's, cast.
    assert torch.equal(
        dict(exported.named_parameters())["lm_head.weight"], base["lm_head.weight"].to(torch.bfloat16)
    )

    assert (
        main(["export", "--run", str(run_dir), "--step", "1", "--out", str(tmp_path / "m1"), "--quiet"]) == 0
    )
    m1 = load_file(str(tmp_path / "m1" / "model.safetensors"))
    step1 = base[f"{module}.weight"].double() + _independent_delta(run_dir / "step-1" / "adapter", module)
    assert torch.equal(m1[f"{module}.weight"], step1.to(torch.bfloat16))

    capsys.readouterr()
    assert main(["export", "--run", str(run_dir), "--step", "3", "--out", str(tmp_path / "m3")]) == 2
    assert "not a finished step" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    # Recomputing block activations in backward must give the same gradients, hence the same adapters.
    plain = small_config(tmp_path, "plain", n=16)
    checkpointed = small_config(tmp_path, "checkpointed", n=16, gradient_checkpointing=True)
    run(plain)
    run(checkpointed)
    for t in (1, 2):
        a = adapter_tensors(Path(plain.output_dir), t)
        b = adapter_tensors(Path(checkpointed.output_dir), t)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
