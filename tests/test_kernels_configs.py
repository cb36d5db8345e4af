"""Triton tile choice per dtype and per card (shared memory), on CPU: no GPU is needed to check it.

The per-block opt-in shared-memory limits are those torch reports as shared_memory_per_block_optin:
sm80 (A100) 166,912 B, sm86 / sm89 (RTX 30xx / 40xx) 101,376 B, sm90 (H100) 232,448 B.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from test_kernels_common import make_inputs

import lowmem_sdpo_kernels.triton_logprobs as triton_logprobs
from lowmem_sdpo_kernels import DEFAULT_TRITON_CONFIG, TritonConfig, linear_logprobs
from lowmem_sdpo_kernels.configs import (
    TRITON_CONFIGS_BY_DTYPE,
    select_triton_config,
    shared_memory_bytes,
)

SM80, SM86, SM90 = 166_912, 101_376, 232_448

# What each card gets, written out by hand from the bound (configs.py): fp32 at the default 64 x 128 x 64 x 3
# stages needs 3 * (64*64 + 64*128) * 4 + 64*128*4 = 180,224 B, bf16/fp16 90,112 B.
EXPECTED = {
    (torch.float32, SM80): TritonConfig(64, 128, 64, 8, 2),  # 2 * 12,288 * 4 + 32,768 = 131,072
    (torch.float32, SM86): TritonConfig(64, 128, 32, 8, 2),  # 2 * 6,144 * 4 + 32,768 = 81,920
    (torch.float32, SM90): DEFAULT_TRITON_CONFIG,  # 180,224
    (torch.float16, SM80): DEFAULT_TRITON_CONFIG,  # 90,112 fits all three
    (torch.float16, SM86): DEFAULT_TRITON_CONFIG,
    (torch.float16, SM90): DEFAULT_TRITON_CONFIG,
    (torch.bfloat16, SM80): DEFAULT_TRITON_CONFIG,
    (torch.bfloat16, SM86): DEFAULT_TRITON_CONFIG,
    (torch.bfloat16, SM90): DEFAULT_TRITON_CONFIG,
}


def test_shared_memory_bound_arithmetic() -> None:
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.float32) == 3 * (64 * 64 + 64 * 128) * 4 + 64 * 128 * 4
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.float32) == 180_224
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.bfloat16) == 90_112
    assert shared_memory_bytes(DEFAULT_TRITON_CONFIG, torch.float16) == 90_112


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


# Compiles for an RTX 30xx target in a fresh interpreter (the test session's kernels are interpreted
# functions, which the compiler cannot take), and prints the compiler's own shared-memory count.
_COMPILE_SM86 = textwrap.dedent(
    """
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lowmem_sdpo_kernels.configs import select_triton_config
    from lowmem_sdpo_kernels.triton_logprobs import _backward_kernel as k
    cfg = select_triton_config(torch.float32, 101_376)
    ptrs = ["H", "W", "B", "LSE", "G", "DH", "DW", "DB"]
    sig = {n: ("*fp32" if n in ptrs else "*i64" if n == "T" else "fp32") for n in k.arg_names[:16]}
    sig.update({n: "i32" for n in ("M", "V", "D", "stride_hm", "stride_hd", "stride_wv", "stride_wd")})
    const = dict(BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, DOT_PRECISION="ieee",
                 COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, FILTER=True,
                 HAS_BIAS=True, HAS_SCALE=True, HAS_SOFTCAP=True)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(k, sig, {(k.arg_names.index(n),): v for n, v in const.items()})
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    print(triton.compile(src, target=GPUTarget("cuda", 86, 32), options=opts).metadata.shared)
    """
)


def test_fp32_choice_for_sm86_fits_by_the_compilers_own_count() -> None:
    # The failure: fp32 on an RTX 30xx/40xx. The installed Triton compiles the chosen config's
    # backward (every option on: dW, db, filter, head transform) for sm86 and must stay within both the
    # card's limit and our bound. Needs Triton's NVIDIA backend (ptxas ships with the wheel), not a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM86], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()):
        pytest.skip(f"Triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    shared = int(proc.stdout.strip().splitlines()[-1])
    cfg = select_triton_config(torch.float32, SM86)
    assert shared <= SM86
    assert shared <= shared_memory_bytes(cfg, torch.float32)
