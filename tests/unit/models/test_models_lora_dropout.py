"""LaneDropout (models/lora_dropout.py): its realised p worked out by hand, its masks' statistics, inverted
scaling and gradient, seeding, replay under activation checkpointing, and its installation by add_lora."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowmem_sdpo.models import add_lora, load_quantized
from lowmem_sdpo.models import lora_dropout as ld
from lowmem_sdpo.models.lora import enable_checkpointing
from lowmem_sdpo.models.lora_dropout import LaneDropout, Lanes, lanes_for
from tests.support.model_fixtures import CPU_QUANT, token_batch, write_llama


def test_realised_p_by_hand():
    # 0.05 * 65536 = 3276.8 -> 3277 levels of 65536: 0.0500031, within 1e-3 of p relative.
    assert lanes_for(0.05) == Lanes(torch.int16, -32768 + 3277, 3277 / 65536)
    # 0.001 * 65536 = 65.5 -> 66 / 65536 is 0.7% off: 32-bit lanes, 4294967 of 2^32.
    assert lanes_for(0.001) == Lanes(torch.int32, -(2**31) + 4294967, 4294967 / 2**32)
    # 1e-9 * 2^32 = 4.3 -> 4: 7% off even in 32 bits, so F.dropout runs; p outside (0, 1) likewise.
    assert lanes_for(1e-9) is None
    assert lanes_for(0.0) is None and lanes_for(1.0) is None


@pytest.mark.parametrize("p", [0.05, 0.3, 0.001])
def test_drop_fraction_matches_p_in_every_lane_of_a_word(p):
    """Each lane position of the 64-bit words (4 per word at 16 bits, 2 at 32) drops at rate p: a lane that
    took the word's sign bit, or a short draw, would show here as a fraction 6 binomial sigmas off."""
    lanes = lanes_for(p)
    per_word = 8 // torch.empty((), dtype=lanes.dtype).element_size()
    torch.manual_seed(0)
    dropped = ld.dropped_mask(torch.Size([1000, 4000]), lanes).reshape(-1, per_word)
    n = dropped.shape[0]
    sigma = math.sqrt(n * lanes.p * (1 - lanes.p))
    for lane in range(per_word):
        assert abs(int(dropped[:, lane].sum()) - n * lanes.p) < 6 * sigma, lane
    # Consecutive elements are independent: both dropped at rate p^2.
    pairs = dropped.reshape(-1)[:-1] & dropped.reshape(-1)[1:]
    m = pairs.numel()
    assert abs(int(pairs.sum()) - m * lanes.p**2) < 6 * math.sqrt(m * lanes.p**2)


def test_kept_values_are_scaled_inversely_and_the_gradient_follows_the_mask():
    layer = LaneDropout(0.3).train()
    p = layer.lanes.p
    x = torch.randn(64, 96, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    kept = out != 0
    assert 0 < int(kept.sum()) < x.numel()
    torch.testing.assert_close(out[kept], x.detach()[kept] / (1 - p), rtol=1e-15, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / (1 - p), 0.0), rtol=1e-15, atol=0)


def test_seeded_reproducible_and_fresh_per_call():
    layer = LaneDropout(0.05).train()
    x = torch.ones(32, 128)
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


def test_masks_do_not_depend_on_the_thread_count():
    """The words come from the serial generator (random_ fills in order): the same masks whatever torch's thread
    count, so the same run on a host with more cores draws the same dropout."""
    before = torch.get_num_threads()
    masks = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(7)
            masks.append(ld.dropped_mask(torch.Size([300, 1000]), lanes_for(0.05)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(masks[0], masks[1])


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(4, 8)
    assert LaneDropout(0.05).eval()(x) is x
    assert LaneDropout(0.0).train()(x) is x


def test_off_cpu_and_unrepresentable_p_run_torch_dropout(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the lane mask must not be drawn here")

    monkeypatch.setattr(ld, "dropped_mask", refuse)
    out = LaneDropout(0.05).train()(torch.empty(4, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 8)
    torch.manual_seed(0)
    tiny_p = LaneDropout(1e-9).train()(torch.ones(10, 10))
    assert torch.allclose(tiny_p, torch.full((10, 10), 1 / (1 - 1e-9)))


def test_checkpointing_replays_the_same_mask():
    """Activation checkpointing stashes the default generator's state and restores it for the recomputation,
    so the gradient through a checkpointed LaneDropout is the uncheckpointed one, bit for bit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), LaneDropout(0.3), nn.Linear(128, 8)).train()
    x = torch.randn(16, 64)

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(11)
        out = checkpoint(net, x, use_reentrant=False) if use_checkpoint else net(x)
        out.square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain, replayed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed, strict=True))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("dropout") / "llama", dtype=torch.float32)


def test_add_lora_installs_the_chosen_dropout(llama_dir):
    lanes = add_lora(load_quantized(llama_dir, quant=CPU_QUANT), r=4, alpha=8, dropout=0.1, seed=0)
    found = [d for m in lanes.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for d in m.lora_dropout.values()]  # fmt: skip
    assert len(found) == 14 and all(type(d) is LaneDropout and d.p == 0.1 for d in found)
    peft_own = add_lora(load_quantized(llama_dir, quant=CPU_QUANT), r=4, alpha=8, dropout=0.1, seed=0,
                        dropout_impl="torch")  # fmt: skip
    assert sum(type(m) is nn.Dropout for m in peft_own.modules()) == 14
    none = add_lora(load_quantized(llama_dir, quant=CPU_QUANT), r=4, alpha=8, dropout=0.0, seed=0)
    assert not any(isinstance(m, (LaneDropout, nn.Dropout)) for m in none.modules())
    with pytest.raises(ValueError, match="known: lanes, torch"):
        add_lora(load_quantized(llama_dir, quant=CPU_QUANT), r=4, alpha=8, dropout=0.1, dropout_impl="fast")


def test_lora_gradients_equal_with_and_without_checkpointing(llama_dir):
    """On the 4-bit Llama with LoRA dropout 0.3: the recomputation of every checkpointed block draws the masks
    its forward drew."""
    ids = token_batch(64)

    def grads(use_checkpoint: bool) -> dict[str, torch.Tensor]:
        policy = add_lora(load_quantized(llama_dir, quant=CPU_QUANT), r=4, alpha=8, dropout=0.3, seed=0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # B = 0 would leave A without a gradient and the masks unseen
                p.data = 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
        if use_checkpoint:
            enable_checkpointing(policy.get_base_model())
        policy.train()
        torch.manual_seed(5)
        policy(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}

    plain, replayed = grads(False), grads(True)
    assert plain.keys() == replayed.keys() and len(plain) == 28
    for name in plain:
        torch.testing.assert_close(replayed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
