"""Triton tile choice per dtype and per card (shared memory), on CPU: no GPU is needed to check it.

The per-block opt-in shared-memory limits are those torch reports as shared_memory_per_block_optin:
sm80 (A100) 166,912 B, sm86 / sm89 (RTX 30xx / 40xx) 101,376 B, sm90 (H100) 232,448 B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lowmem_sdpo_kernels.triton_logprobs as triton_logprobs
from lowmem_sdpo_kernels import DEFAULT_TRITON_CONFIG, TritonConfig, linear_logprobs
from lowmem_sdpo_kernels.configs import (
    HALF_TRITON_CONFIG,
    TRITON_CONFIGS_BY_DTYPE,
    select_triton_config,
    shared_memory_bytes,
)
from tests.support.kernel_cases import make_inputs

SM80, SM86, SM90 = 166_912, 101_376, 232_448

# What each card gets, written out by hand from the bound (configs.py): fp32 at the default 64 x 128 x 64 x 3
# stages needs 3 * (64*64 + 64*128) * 4 + 64*128*4 = 180,224 B, bf16/fp16 90,112 B. The half-precision
# first choice 128 x 128 x 32 x 3 stages needs 3 * (128*32 + 32*128) * 2 + 128*128*2 = 81,920 B: all three.
EXPECTED = {
    (torch.float32, SM80): TritonConfig(64, 128, 64, 8, 2),  # 2 * 12,288 * 4 + 32,768 = 131,072
    (torch.float32, SM86): TritonConfig(64, 128, 32, 8, 2),  # 2 * 6,144 * 4 + 32,768 = 81,920
    (torch.float32, SM90): DEFAULT_TRITON_CONFIG,  # 180,224
    (torch.float16, SM80): HALF_TRITON_CONFIG,  # 81,920
    (torch.float16, SM86): HALF_TRITON_CONFIG,
    (torch.float16, SM90): HALF_TRITON_CONFIG,
    (torch.bfloat16, SM80): HALF_TRITON_CONFIG,
    (torch.bfloat16, SM86): HALF_TRITON_CONFIG,
    (torch.bfloat16, SM90): HALF_TRITON_CONFIG,
}


def test_shared_memory_bound_arithmetic() -> None:
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.float32) == 3 * (64 * 64 + 64 * 128) * 4 + 64 * 128 * 4
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.float32) == 180_224
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.bfloat16) == 90_112
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.float16) == 90_112
    assert shared_memory_bytes(HALF_TRITON_CONFIG, torch.bfloat16) == 81_920


@pytest.mark.parametrize("limit", [SM80, SM86, SM90], ids=["sm80", "sm86", "sm90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_first_config_that_fits_is_chosen(dtype: torch.dtype, limit: int) -> None:
    chosen = select_triton_config(dtype, limit)
    assert chosen == EXPECTED[(dtype, limit)]
    assert shared_memory_bytes(chosen, dtype) <= limit
    earlier = TRITON_CONFIGS_BY_DTYPE[dtype][: TRITON_CONFIGS_BY_DTYPE[dtype].index(chosen)]
    assert all(shared_memory_bytes(cfg, dtype) > limit for cfg in earlier)


def test_no_limit_known_takes_the_default_and_a_tiny_card_gets_none() -> None:
    # Off CUDA (the interpreter) there is no limit: the first config, i.e. the one used before this choice.
    for dtype in TRITON_CONFIGS_BY_DTYPE:
        assert select_triton_config(dtype, None) == DEFAULT_TRITON_CONFIG
        assert select_triton_config(dtype, 8 * 1024) is None


def test_no_fitting_config_falls_back_to_torch_with_one_warning(monkeypatch) -> None:
    # A card whose limit no config fits: impl="triton" must run the chunked torch impl (same numbers)
    # and say so in one line, instead of failing with OutOfResources at the first launch.
    # (the package attribute linear_logprobs is the function, so the module is taken from sys.modules)
    for module in (triton_logprobs, sys.modules["lowmem_sdpo_kernels.linear_logprobs"]):
        monkeypatch.setattr(module, "device_smem_limit", lambda device: 8 * 1024)
    hidden, weight, targets, _ = make_inputs(9, 16, 40, torch.float32, device="cpu")
    for triton_config in (None, "autotune"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = linear_logprobs(hidden, weight, targets, impl="triton", triton_config=triton_config)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "\n" not in messages[0]
        assert "fits 8192 B of shared memory" in messages[0] and "impl='torch'" in messages[0]
        assert torch.equal(out, linear_logprobs(hidden, weight, targets, impl="torch"))


# Compiles for a GPU target in a fresh interpreter (the test session's kernels are interpreted functions,
# which the compiler cannot take) through benchmarks/kernel_resources.py, which reads the compiler's own
# shared-memory count and ptxas's register / spill-stack use. Needs Triton's NVIDIA backend (ptxas and
# cuobjdump ship with the wheel), not a GPU.
RESOURCES = Path(__file__).resolve().parents[3] / "benchmarks" / "kernel_resources.py"


def _compiled_resources(tmp_path: Path, arch: int, dtype: str, cfg: TritonConfig, kernels: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    spec = ",".join(str(x) for x in (cfg.block_m, cfg.block_v, cfg.block_d, cfg.num_warps, cfg.num_stages, cfg.group_m))
    out = tmp_path / "resources.json"
    cmd = [sys.executable, str(RESOURCES), "--arch", str(arch), "--dtype", dtype, "--config", spec,
           "--kernels", *kernels, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()):
        pytest.skip(f"Triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_fp32_choice_for_sm86_fits_by_the_compilers_own_count(tmp_path: Path) -> None:
    # The failure: fp32 on an RTX 30xx/40xx. The chosen config's backward (dW and the filter on)
    # compiled for sm86 must stay within both the card's limit and our bound.
    cfg = select_triton_config(torch.float32, SM86)
    (row,) = _compiled_resources(tmp_path, 86, "fp32", cfg, ["backward-dW-bound"])
    assert row["shared_bytes"] <= SM86
    assert row["shared_bytes"] <= shared_memory_bytes(cfg, torch.float32)


def test_half_default_does_not_spill_on_sm90(tmp_path: Path) -> None:
    # Issue 13: the bf16 tile must fit Hopper's registers. The forward and the frozen-weight backward (the
    # sDPO case, filter on as "auto" turns it on for bf16) compiled for sm90: no spill stack, and the
    # shared memory within the bound and the card.
    cfg = select_triton_config(torch.bfloat16, SM90)
    rows = _compiled_resources(tmp_path, 90, "bf16", cfg, ["forward", "backward-frozen-bound"])
    for row in rows:
        assert row["spill_stack_bytes"] == 0, row
        assert row["shared_bytes"] <= min(SM90, shared_memory_bytes(cfg, torch.bfloat16)), row


def test_autotune_skips_only_configs_that_do_not_fit() -> None:
    # time_configs is the tuner's loop: OutOfResources (the compiler could not fit registers / shared
    # memory) drops that config; any other error, e.g. a CUDA fault inside a launch, must propagate.
    from triton.runtime.errors import OutOfResources

    a, b, c = (TritonConfig(16, 16, 16, 1, 1, group_m=g) for g in (1, 2, 3))

    def bench(cfg: TritonConfig) -> float:
        if cfg == b:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return float(cfg.group_m)

    assert triton_logprobs.time_configs((a, b, c), bench) == {a: 1.0, c: 3.0}

    def faulty(cfg: TritonConfig) -> float:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        triton_logprobs.time_configs((a, b), faulty)


# ---- No config over a card's shared memory is ever launched (issue 25) ----
# The compiler's own counts, per GPU target, as the JIT specialises a launch (unit strides constant, sizes divisible
# by 16), from benchmarks/kernel_resources.py (Triton 3.6, the GPU image's): the sizes the op's check reads on a card.
COMPILED = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "kernel_resources_compiled.json"
LIMITS = {80: SM80, 86: SM86, 90: SM90}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _compiled_sizes(arch: int, dtype: torch.dtype, trained_weight: bool) -> dict[TritonConfig, int]:
    """Per config, the largest shared memory of the launches a call makes: the forward and the backward of that
    weight mode (every filter variant: the call may use any of them)."""
    rows = json.loads(COMPILED.read_text())["rows"]
    kinds = ("backward-dW",) if trained_weight else ("backward-frozen",)
    sizes: dict[TritonConfig, int] = {}
    for row in rows:
        if row["arch"] != arch or row["dtype"] != DTYPE_NAMES[dtype]:
            continue
        if row["kernel"] == "forward" or row["kernel"].startswith(kinds):
            cfg = TritonConfig(*(row[k] for k in ("block_m", "block_v", "block_d", "num_warps", "num_stages", "group_m")))
            sizes[cfg] = max(sizes.get(cfg, 0), row["shared_bytes"])
    return sizes


@pytest.mark.parametrize("trained_weight", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("arch", sorted(LIMITS), ids=lambda a: f"sm{a}")
def test_autotune_never_launches_a_config_over_the_cards_shared_memory(arch: int, trained_weight: bool) -> None:
    from triton.runtime.errors import OutOfResources

    from lowmem_sdpo_kernels.configs import AUTOTUNE_TRITON_CONFIGS, fitting_configs

    limit, sizes = LIMITS[arch], _compiled_sizes(arch, torch.bfloat16, trained_weight)
    assert set(AUTOTUNE_TRITON_CONFIGS) <= set(sizes), "regenerate kernel_resources_compiled.json"
    launched: list[TritonConfig] = []

    def bench(cfg: TritonConfig) -> float:  # the card: a launch over its limit raises, as Triton's loader does
        launched.append(cfg)
        if sizes[cfg] > limit:
            raise OutOfResources(sizes[cfg], limit, "shared memory")
        return 1.0

    timed = triton_logprobs.time_configs(fitting_configs(AUTOTUNE_TRITON_CONFIGS, torch.bfloat16, limit, sizes.get),
                                         bench)
    assert all(sizes[cfg] <= limit for cfg in launched)
    assert set(timed) == set(launched) == {cfg for cfg in AUTOTUNE_TRITON_CONFIGS if sizes[cfg] <= limit}


def test_the_compiled_counts_exceed_the_estimate_where_it_matters() -> None:
    # Why the filter reads the compiler and not the estimate: on sm90 the bf16 default's trained-weight backward
    # needs more than the estimate says, and on sm86 a tile the estimate nearly fits is far over the card.
    sm90 = _compiled_sizes(90, torch.bfloat16, trained_weight=True)
    assert sm90[HALF_TRITON_CONFIG] > shared_memory_bytes(HALF_TRITON_CONFIG, torch.bfloat16)
    sm86 = _compiled_sizes(86, torch.bfloat16, trained_weight=True)
    over = [cfg for cfg, size in sm86.items() if size > SM86]
    assert over and any(size > shared_memory_bytes(cfg, torch.bfloat16) for cfg, size in sm86.items())


@pytest.mark.parametrize("trained_weight", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("arch", sorted(LIMITS), ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype", sorted(DTYPE_NAMES, key=str), ids=str)
def test_every_card_gets_a_default_that_fits_by_the_compilers_count(
    dtype: torch.dtype, arch: int, trained_weight: bool
) -> None:
    from lowmem_sdpo_kernels.configs import fitting_configs

    limit, sizes = LIMITS[arch], _compiled_sizes(arch, dtype, trained_weight)
    assert set(TRITON_CONFIGS_BY_DTYPE[dtype]) <= set(sizes), "regenerate kernel_resources_compiled.json"
    asked: list[TritonConfig] = []

    def compiled(cfg: TritonConfig) -> int:
        asked.append(cfg)
        return sizes[cfg]

    chosen = next(fitting_configs(TRITON_CONFIGS_BY_DTYPE[dtype], dtype, limit, compiled), None)
    assert chosen is not None and sizes[chosen] <= limit
    order = TRITON_CONFIGS_BY_DTYPE[dtype]
    assert asked == list(order[: order.index(chosen) + 1])  # lazy: nothing compiled past the choice
    assert all(sizes[cfg] > limit for cfg in asked[:-1])


def test_the_op_checks_its_own_launches_and_keeps_one_tile_per_model(monkeypatch) -> None:
    # The op's default choice on a card, on CPU: the device's limit and the compiler's count are stood in for
    # (sm86, the counts of kernel_resources_compiled.json for the very launches the op builds). fp32 on sm86: the
    # first config's trained-weight backward (147,456 B) is over 101,376 B, the second (98,304 B) fits. The choice
    # must not change with grad mode (the reference pass runs under no_grad) or the batch's row count.
    rows = [r for r in json.loads(COMPILED.read_text())["rows"] if r["arch"] == 86 and r["dtype"] == "fp32"]
    variant = {(True, 0): "backward-dW", (True, 1): "backward-dW-bound", (False, 0): "backward-frozen",
               (False, 1): "backward-frozen-bound", (False, 2): "backward-frozen-element"}
    compiled: list[tuple[str, TritonConfig]] = []

    def counts(launches) -> int:
        sizes = [0]
        for launch in launches:
            kw = launch.kwargs
            cfg = TritonConfig(kw["BLOCK_M"], kw["BLOCK_V"], kw["BLOCK_D"], kw["num_warps"], kw["num_stages"],
                               kw["GROUP_M"])
            name = "forward" if "COMPUTE_DW" not in kw else variant[(kw["COMPUTE_DW"], kw["FILTER"])]
            compiled.append((name, cfg))
            (row,) = [r for r in rows if r["kernel"] == name and TritonConfig(
                *(r[k] for k in ("block_m", "block_v", "block_d", "num_warps", "num_stages", "group_m"))) == cfg]
            sizes.append(row["shared_bytes"])
        return max(sizes)

    monkeypatch.setattr(triton_logprobs, "device_smem_limit", lambda device: SM86)
    monkeypatch.setattr(triton_logprobs, "compiled_shared_bytes", counts)
    monkeypatch.setattr(triton_logprobs, "_FIT_CACHE", {})
    weight = torch.zeros(32000, 4096).requires_grad_(True)
    options = triton_logprobs.OpOptions()
    choices = []
    for n_rows, grad in ((4096, True), (100, False), (1000, True)):
        hidden = torch.zeros(n_rows, 4096, requires_grad=grad)
        targets = torch.zeros(n_rows, dtype=torch.int64)
        with torch.set_grad_enabled(grad):
            choices.append(triton_logprobs.fitting_default_config(hidden, weight, None, targets, None, options))
    first, second = TRITON_CONFIGS_BY_DTYPE[torch.float32][:2]
    assert choices == [second] * 3
    # Checked once (the cache), forward and trained-weight backward of each config tried, in order.
    assert compiled == [("forward", first), ("backward-dW", first), ("forward", second), ("backward-dW", second)]
