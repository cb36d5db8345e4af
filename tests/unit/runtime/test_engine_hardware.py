"""Precision and kernel choice per card, on CPU: the card's capabilities are injected (DeviceCaps), and the
expected outcomes are written out per card from NVIDIA's and Triton's documented support (bf16 from sm80,
Triton from sm70, Triton bf16 from sm80), not derived from the code's constants."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.engine.config import RunConfig
from lowmem_sdpo.errors import InputError
from lowmem_sdpo.runtime.hardware import DeviceCaps, Hardware, cuda_caps, kernel_impl_for, resolve_hardware

CARDS = {
    "sm61": DeviceCaps((6, 1), bf16=False, name="GTX 1080"),
    "sm70": DeviceCaps((7, 0), bf16=False, name="V100"),
    "sm75": DeviceCaps((7, 5), bf16=False, name="T4"),
    "sm80": DeviceCaps((8, 0), bf16=True, name="A100"),
    "sm90": DeviceCaps((9, 0), bf16=True, name="H100"),
}


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as if one card were present (only what resolve_hardware asks before it reads the caps)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _hw(card: str, dtype: str = "auto") -> Hardware:
    return resolve_hardware(RunConfig(device="cuda", compute_dtype=dtype), caps=CARDS[card])


@pytest.mark.parametrize(
    ("card", "dtype", "scaler"),
    [
        ("sm70", "float16", True),
        ("sm75", "float16", True),
        ("sm80", "bfloat16", False),
        ("sm90", "bfloat16", False),
    ],
)
def test_auto_dtype_is_bf16_only_where_the_card_has_it(fake_cuda, card, dtype, scaler):
    hw = _hw(card)
    assert hw.is_cuda and hw.caps == CARDS[card]
    assert hw.compute_dtype == dtype
    assert hw.needs_grad_scaler is scaler


@pytest.mark.parametrize("card", ["sm70", "sm75"])
def test_explicit_bf16_on_a_card_without_it_names_the_capability(fake_cuda, card):
    with pytest.raises(InputError) as err:
        _hw(card, "bfloat16")
    message = str(err.value)
    major, minor = CARDS[card].capability
    assert message.startswith("--compute-dtype bfloat16")
    assert f"compute capability {major}.{minor}" in message and CARDS[card].name in message


@pytest.mark.parametrize("card", ["sm70", "sm75", "sm80", "sm90"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_explicit_fp16_and_fp32_run_on_every_card(fake_cuda, card, dtype):
    hw = _hw(card, dtype)
    assert hw.compute_dtype == dtype and hw.needs_grad_scaler is (dtype == "float16")


@pytest.mark.parametrize("card", ["sm80", "sm90"])
def test_explicit_bf16_on_ampere_and_later(fake_cuda, card):
    assert _hw(card, "bfloat16").compute_dtype == "bfloat16"


def test_cpu_auto_is_fp32_without_scaler():
    hw = resolve_hardware(RunConfig(device="cpu"))
    assert (hw.device.type, hw.compute_dtype, hw.caps, hw.needs_grad_scaler) == (
        "cpu",
        "float32",
        None,
        False,
    )


# (card, dtype) -> what `auto` becomes and whether an explicit "triton" is accepted.
KERNEL_CASES = [
    ("sm61", "float16", "torch", False),  # below Volta: no Triton at all
    ("sm61", "float32", "torch", False),
    ("sm70", "float16", "auto", True),
    ("sm70", "float32", "auto", True),
    ("sm75", "float16", "auto", True),
    ("sm70", "bfloat16", "torch", False),  # bf16 Triton needs sm80 (reachable only through a Hardware built
    ("sm75", "bfloat16", "torch", False),  # by hand: resolve_hardware refuses bf16 on these cards)
    ("sm80", "bfloat16", "auto", True),
    ("sm80", "float16", "auto", True),
    ("sm90", "bfloat16", "auto", True),
]


@pytest.mark.parametrize(("card", "dtype", "auto_becomes", "triton_ok"), KERNEL_CASES)
def test_triton_is_never_handed_a_dtype_the_card_cannot_run(card, dtype, auto_becomes, triton_ok):
    hw = Hardware(torch.device("cuda", 0), dtype, CARDS[card])
    assert kernel_impl_for(hw, "auto") == auto_becomes
    assert kernel_impl_for(hw, "torch") == "torch" and kernel_impl_for(hw, "naive") == "naive"
    if triton_ok:
        assert kernel_impl_for(hw, "triton") == "triton"
    else:
        with pytest.raises(InputError) as err:
            kernel_impl_for(hw, "triton")
        major, minor = CARDS[card].capability
        assert str(err.value).startswith("--logprob-impl triton")
        assert f"compute capability {major}.{minor}" in str(err.value)


def test_kernel_choice_on_cpu_is_left_to_the_kernels_package():
    hw = Hardware(torch.device("cpu"), "float32")
    assert [kernel_impl_for(hw, name) for name in ("auto", "torch", "triton")] == ["auto", "torch", "triton"]


@pytest.mark.parametrize(("major", "bf16"), [(7, False), (8, True), (9, True)])
def test_cuda_caps_asks_for_native_bf16_not_torch_emulation(monkeypatch, major, bf16):
    # torch.cuda.is_bf16_supported() reports True on pre-Ampere cards by default (emulation); the caps must
    # not, or `auto` would pick bf16 on a T4 again.
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or major >= 8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "card")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert cuda_caps(torch.device("cuda", 0)) == DeviceCaps((major, 5), bf16=bf16, name="card")
