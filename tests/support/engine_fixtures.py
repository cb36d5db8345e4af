"""Small sDPO runs of the tiny model for the engine tests (a plain module the tests import).

The data are slices of the bundled toy steps (examples/data), so a run takes seconds: 24 pairs per step,
batches of 4 pairs, 2 micro-batches per optimiser step -> 3 optimiser steps per sDPO step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowmem_sdpo.engine import RunConfig, run_sdpo

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "examples" / "data"


def toy_slice(dst: Path, step: int, n: int, start: int = 0) -> Path:
    lines = (TOY / f"toy_step{step}.jsonl").read_text().splitlines()[start : start + n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n")
    return dst


def unpaired_toy(dst: Path, n_pairs: int) -> Path:
    """The toy pairs as unpaired rows (prompt, completion, label): the chosen answer desirable, the rejected not;
    every other row's rejected answer is left out so the labels are unbalanced (the engine cycles the minority)."""
    rows = []
    for i, line in enumerate((TOY / "toy_step1.jsonl").read_text().splitlines()[:n_pairs]):
        pair = json.loads(line)
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        if i % 3:
            rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def small_config(tmp: Path, name: str = "run", n: int = 24, **overrides: Any) -> RunConfig:
    data = tmp / "data"
    s1 = toy_slice(data / "s1.jsonl", 1, n)
    s2 = toy_slice(data / "s2.jsonl", 2, n)
    values: dict[str, Any] = {
        "model": "tiny",
        "steps": f"{s1},{s2}",
        "output_dir": str(tmp / name),
        "max_length": 32,
        "max_prompt_length": 24,
        "beta": 0.5,
        "learning_rate": 1e-2,
        "batch_size": 4,
        "grad_accum": 2,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "save_every": 1,
        "device": "cpu",
        "gradient_checkpointing": False,
        "quiet": True,
        # bound_cpu_heap sets glibc's mmap threshold for the whole process (runtime/cpu_heap.py): in-process test
        # runs leave the pytest process's malloc as it is; the CLI tests run it in processes of their own.
        "bound_cpu_heap": False,
    }
    values.update(overrides)
    return RunConfig(**values)


def run(config: RunConfig, **kwargs: Any) -> list[dict[str, Any]]:
    return run_sdpo(config, **kwargs)


def cli_flags(config: RunConfig) -> list[str]:
    """The `lowmem-sdpo run` command line that makes `config` (every option spelled out)."""
    args: list[str] = []
    for key, value in config.to_dict().items():
        if key == "loss_options" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def adapter_tensors(run_dir: Path, t: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / f"step-{t}" / "adapter" / "adapter_model.safetensors"))


def reference_table(model: Any, units: list, pad_id: int, batch_size: int = 4) -> Any:
    """compute_logps on CPU with the torch impl, no KL rows, silent: the reference pass the tests compare with."""
    import torch

    from lowmem_sdpo.engine.reference.logps import compute_logps
    from lowmem_sdpo.runtime.hardware import Hardware
    from lowmem_sdpo.runtime.reporting import Reporter

    cpu = Hardware(torch.device("cpu"), "float32")
    return compute_logps(
        model,
        units,
        pad_id=pad_id,
        batch_size=batch_size,
        hw=cpu,
        impl="torch",
        with_kl=False,
        reporter=Reporter(True),
        description="reference",
    )
