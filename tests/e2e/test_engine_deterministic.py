"""--deterministic (issue 13): a run flag that reaches the engine's choice of log-prob implementation."""

from __future__ import annotations

import argparse

import pytest
import torch

import lowmem_sdpo_kernels
from lowmem_sdpo.cli.run_cmd import add_run_arguments, config_from_args
from lowmem_sdpo.engine.training.deterministic import training_impl
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.hardware import Hardware

CPU = Hardware(torch.device("cpu"), "float32")


def _config(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_flag_reaches_the_config_and_defaults_off() -> None:
    assert _config(["--model", "m", "--steps", "d.jsonl"]).deterministic is False
    assert _config(["--model", "m", "--steps", "d.jsonl", "--deterministic"]).deterministic is True


def test_auto_takes_the_ordered_impl_where_triton_would_run(monkeypatch) -> None:
    # Where "auto" resolves to the Triton kernels (a CUDA device), --deterministic swaps in the torch impl.
    # (the engine asks lowmem_sdpo_kernels.resolve_impl through runtime.hardware.resolve_logprob_impl)
    monkeypatch.setattr(lowmem_sdpo_kernels, "resolve_impl", lambda name, tensor: "triton" if name == "auto" else name)
    assert training_impl(CPU, "auto") == "triton"
    assert training_impl(CPU, "auto", deterministic=True) == "torch"
    assert training_impl(CPU, "torch", deterministic=True) == "torch"


def test_explicit_triton_with_deterministic_is_refused_in_one_line() -> None:
    # conftest runs Triton interpreted on CPU, so "triton" resolves here; asked for together with
    # --deterministic it is a contradiction, named, not silently replaced.
    assert training_impl(CPU, "triton") == "triton"
    with pytest.raises(InputError, match=r"^--deterministic: --logprob-impl triton sums its gradients with atomics"):
        training_impl(CPU, "triton", deterministic=True)
