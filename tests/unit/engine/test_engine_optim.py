"""--optim: what `auto` resolves to on CUDA and CPU (is_cuda and bitsandbytes' presence passed in), the refusals,
and that each registry entry builds on CPU and takes Adam's first step (checked against Adam's closed form)."""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.engine.config import CHOICES
from lowmem_sdpo.engine.training.optim import OPTIMIZERS, make_optimizer, resolve_optimizer
from lowmem_sdpo.errors import InputError


@pytest.mark.parametrize(
    ("on_cuda", "bnb", "expected"),
    [
        (True, True, "adamw_8bit"),  # non-paged: paged buffers are never freed and sync per parameter
        (True, False, "adamw_fused"),
        (False, True, "adamw"),
        (False, False, "adamw"),
    ],
)
def test_auto(on_cuda, bnb, expected):
    assert resolve_optimizer("auto", on_cuda, bnb_available=bnb) == expected


@pytest.mark.parametrize(
    "name", ["adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
)
def test_every_name_is_selectable_on_cuda(name):
    assert resolve_optimizer(name, on_cuda=True, bnb_available=True) == name


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_on_cpu_is_refused(name):
    with pytest.raises(InputError, match=f"--optim {name}: paged optimisers need CUDA"):
        resolve_optimizer(name, on_cuda=False, bnb_available=True)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimisers_without_bitsandbytes_are_refused(name):
    with pytest.raises(InputError, match=f"--optim {name}: bitsandbytes is not installed"):
        resolve_optimizer(name, on_cuda=True, bnb_available=False)


def test_config_choices_are_the_registry():
    assert set(CHOICES["optim"]) == {"auto", *OPTIMIZERS}


# name -> (optimiser class name, dtype of its first moment state): what each entry must build.
EXPECTED = {
    "adamw": ("AdamW", torch.float32),
    "adamw_fused": ("AdamW", torch.float32),
    "adamw_8bit": ("AdamW8bit", torch.uint8),
    "paged_adamw_8bit": ("PagedAdamW8bit", torch.uint8),
    "paged_adamw_32bit": ("PagedAdamW32bit", torch.float32),
}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_entry_builds_and_takes_adams_first_step(name):
    # Adam's first step: m = (1 - b1) g, v = (1 - b2) g^2, so the bias-corrected update is g / |g| (up to eps):
    # p1 = p0 - lr * sign(g) - lr * wd * p0 (decoupled decay). 4096+ elements: bitsandbytes keeps smaller
    # tensors' state in 32 bit.
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 128, generator=gen)
    grad = torch.randn(64, 128, generator=gen)
    param = torch.nn.Parameter(p0.clone())
    lr, wd = 1e-2, 0.1
    opt = make_optimizer(name, [param], lr, wd)
    class_name, state_dtype = EXPECTED[name]
    assert type(opt).__name__ == class_name
    if name == "adamw_fused":
        assert opt.defaults["fused"] is True
    param.grad = grad
    opt.step()
    want = p0 - lr * torch.sign(grad) - lr * wd * p0
    torch.testing.assert_close(param.detach(), want, atol=lr * 1e-3, rtol=0)
    first_moment = opt.state[param].get("exp_avg", opt.state[param].get("state1"))
    assert first_moment.dtype == state_dtype
