"""The lm head of a loaded causal LM, as the fused log-prob kernels take it: weight, bias, scale, softcap.

The kernels compute z = softcap(scale * (h @ W^T + b)), softcap(y) = c * tanh(y / c). Which models need
what is read from two places:
  * the output-embedding module: it must be a plain nn.Linear (weight, optional bias);
  * config attributes, through LOGIT_RULES (attribute -> how its value transforms the logits).
A head that cannot be represented is refused with one InputError line naming the module or the attribute,
never approximated: training on the log-probs of a different function than the model is silent damage.

Three layers, cheapest first:
  1. the module's type (read_head);
  2. config attributes whose names look like logits business ("logit", "softcap") but are neither a rule
     nor known to act elsewhere (NOT_HEAD_ATTRIBUTES): refused by name (read_head);
  3. at load (check_head), a probe: the model's own forward, with the decoder's output replaced by known
     hidden states, must give the logits of the spec. This catches what no name reveals (a multiplier
     called "output_multiplier", a vocabulary slice, a forward that does not go through get_decoder()).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowmem_sdpo.errors import InputError


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True, eq=False)  # holds tensors: identity, not elementwise ==
class HeadSpec:
    """What the kernels need: z = softcap(logit_scale * (h @ weight^T + bias))."""

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None = None  # [V]
    logit_scale: float = 1.0
    softcap: float | None = None

    def kernel_kwargs(self) -> dict[str, Any]:
        """Keywords for lowmem_sdpo_kernels.linear_logprobs / sequence_logprobs."""
        return {"bias": self.bias, "logit_scale": self.logit_scale, "softcap": self.softcap}

    def describe(self) -> str:
        parts = [f"weight {tuple(self.weight.shape)}", "bias" if self.bias is not None else "no bias"]
        parts.append(f"scale {self.logit_scale:g}")
        parts.append(f"softcap {self.softcap:g}" if self.softcap is not None else "no softcap")
        return ", ".join(parts)


@dataclass(frozen=True)
class LogitRule:
    """How one config attribute's value transforms the logits. A value of None means "not applied"."""

    used_by: str  # architectures, for messages and readers
    scale: Callable[[float], float] | None = None  # factor the logits are multiplied by
    softcap: bool = False  # the value is the final tanh softcap c


# Checked against each architecture's forward in transformers (modeling_<arch>.py, after lm_head):
LOGIT_RULES: dict[str, LogitRule] = {
    # cohere, cohere2: logits = logits * self.logit_scale
    "logit_scale": LogitRule("Cohere, Cohere2", scale=lambda v: v),
    # granite, granitemoe: logits = logits / self.config.logits_scaling
    "logits_scaling": LogitRule("Granite, GraniteMoE", scale=lambda v: 1.0 / v),
    # gemma2, gemma3: logits = tanh(logits / c) * c with c = config.final_logit_softcapping
    "final_logit_softcapping": LogitRule("Gemma 2, Gemma 3", softcap=True),
    # recurrent_gemma: logits = tanh(logits / cap) * cap with cap = config.logits_soft_cap
    "logits_soft_cap": LogitRule("RecurrentGemma", softcap=True),
}

# Attributes whose names match LOGITS_NAME but that act somewhere other than the lm-head logits.
NOT_HEAD_ATTRIBUTES: dict[str, str] = {
    "attn_logit_softcapping": "attention scores",
    "attention_logit_cap": "attention scores",
    "conf_attention_logit_cap": "attention scores",
    "attention_invalid_logits_value": "attention mask fill value",
    "output_router_logits": "MoE router outputs",
    "router_logit_softcapping": "MoE router",
    "moe_router_logit_softcapping": "MoE router",
    "num_logits_to_keep": "which positions get logits, not their values",
    "output_auxiliary_logits": "extra outputs",
    "mlp_up_softcap": "MLP activations",
    "mlp_gate_softcap": "MLP activations",
    "gate_soft_cap": "MLP activations",
    "logit_scale_init_value": "contrastive (CLIP-like) heads",
    "max_logit_scale": "contrastive (CLIP-like) heads",
    "contrastive_logits_temperature": "contrastive heads",
    "average_logits_per_cell": "table QA heads",
}

LOGITS_NAME = re.compile(r"logit|soft_?cap", re.IGNORECASE)
# Names listed as suspects when the probe fails (wider than LOGITS_NAME: it only informs).
SUSPECT_NAME = re.compile(r"logit|soft_?cap|scal|multiplier|temperature", re.IGNORECASE)


def _model_name(lm: nn.Module) -> str:
    config = getattr(lm, "config", None)
    path = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return f"{path} ({type(lm).__name__})" if path else type(lm).__name__


def _configs(lm: nn.Module) -> list[Any]:
    """The text config first (where multimodal models keep the head's attributes), then the top one."""
    config = lm.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [text] if text is config else [text, config]


def _attributes(lm: nn.Module) -> dict[str, Any]:
    """Scalar config attributes, text config winning over the top-level one."""
    found: dict[str, Any] = {}
    for config in reversed(_configs(lm)):
        found.update({k: v for k, v in config.to_dict().items() if not isinstance(v, dict | list)})
    return found


def _read_module(lm: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise InputError(f"model {name}: no output embeddings (lm head); lowmem-sdpo needs a causal LM head")
    # Exactly nn.Linear: subclasses (bitsandbytes' Linear4bit, peft's LoRA layers) compute something else.
    if type(head) is not nn.Linear:
        raise InputError(
            f"model {name}: lm head is {type(head).__module__}.{type(head).__name__}; the fused log-prob kernels "
            "need a plain torch.nn.Linear (full-precision weight, optional bias)"
        )
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        raise InputError(f"model {name}: lm head has forward hooks or a replaced forward; its output is not W h + b")
    if not head.weight.is_floating_point():
        raise InputError(f"model {name}: lm head weight has dtype {head.weight.dtype}; expected a float dtype")
    return head.weight, head.bias


def read_head(lm: nn.Module, rules: dict[str, LogitRule] = LOGIT_RULES) -> HeadSpec:
    """The head spec of a causal LM (a peft wrapper is unwrapped). InputError names what cannot be represented.

    Cheap (a module type check and a scan of the config's scalar attributes), so callers may call it per batch.
    """
    lm = causal_lm(lm)
    name = _model_name(lm)
    weight, bias = _read_module(lm, name)
    attributes = _attributes(lm)
    scale, softcap = 1.0, None
    for attr, rule in rules.items():
        value = attributes.get(attr)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value == 0:
            raise InputError(f"model {name}: config {attr}={value!r}; expected a finite non-zero number or null")
        if rule.scale is not None:
            scale *= rule.scale(float(value))
        if rule.softcap:
            if softcap is not None or value < 0:
                raise InputError(f"model {name}: config {attr}={value!r}; expected one positive softcap")
            softcap = float(value)
    for attr, value in attributes.items():
        if LOGITS_NAME.search(attr) and attr not in rules and attr not in NOT_HEAD_ATTRIBUTES:
            if value is not None and value is not False:
                known = ", ".join(sorted(rules))
                raise InputError(
                    f"model {name}: config {attr}={value!r} may change the lm-head logits and lowmem-sdpo does not "
                    f"know how (it knows {known}); refusing rather than training on wrong log-probs"
                )
    return HeadSpec(weight=weight, bias=bias, logit_scale=scale, softcap=softcap)


def spec_logits(spec: HeadSpec, hidden: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) [n, V] in fp32 for hidden [n, D]: y = scale * (h W^T + b) before the softcap, z after.

    The weight is upcast a chunk of `chunk` vocabulary rows at a time: a whole fp32 copy of a 32000 x 4096
    head would be 512 MiB just for this check; a chunk is 64 MiB.
    """
    h = hidden.float()
    ys = []
    for v0 in range(0, spec.weight.shape[0], chunk):
        y = h @ spec.weight[v0 : v0 + chunk].float().T
        if spec.bias is not None:
            y = y + spec.bias[v0 : v0 + chunk].float()
        ys.append(y * spec.logit_scale)
    y = torch.cat(ys, dim=-1)
    z = y if spec.softcap is None else spec.softcap * torch.tanh(y / spec.softcap)
    return z, y


# The probe's second hidden state is the first one rescaled so its largest raw logit is this large (or
# 3 x the softcap): a real row of a random or untrained model has logits of order 1, where c * tanh(x / c)
# differs from x by only x^3 / (3 c^2) (5e-5 at x = 0.5, c = 30) and would pass unnoticed.
PROBE_LOGIT = 20.0
# Tolerance per row: this many units of the compute dtype's epsilon times the row's largest |y| (plus 1).
# Both sides round the same matmul in different orders; a structural difference (a missing scale, cap or
# slice) is of the order of |y| itself.
PROBE_ROUNDINGS = 16.0


def _probe_hidden(hidden: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """[1, T, D] decoder output -> [1, 2, D]: the real first position and a rescaled copy of it."""
    first = hidden[:, :1]
    with torch.no_grad():
        raw, _ = spec_logits(HeadSpec(spec.weight), first[0])  # h W^T alone
        target = (3.0 * spec.softcap if spec.softcap is not None else PROBE_LOGIT) / abs(spec.logit_scale)
        factor = target / max(float(raw.abs().max()), 1e-6)
    return torch.cat([first, first * factor], dim=1).to(hidden.dtype)


def _suspects(lm: nn.Module) -> str:
    attributes = _attributes(lm)
    names = [
        f"{k}={v!r}"
        for k, v in sorted(attributes.items())
        if SUSPECT_NAME.search(k)
        and k not in NOT_HEAD_ATTRIBUTES
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    ]
    return ", ".join(names) if names else "none found by name"


def check_head(model: nn.Module, spec: HeadSpec | None = None) -> HeadSpec:
    """read_head, then verify on a 2-token probe that the model's own forward gives the spec's logits.

    The decoder's output is replaced (forward hook) by known hidden states, so the comparison is between
    transformers' head code and the spec on the very same h. InputError (one line) if they differ beyond
    rounding, naming the config attributes that might be why. `spec` defaults to read_head(model).
    """
    lm = causal_lm(model)
    spec = read_head(lm) if spec is None else spec
    name = _model_name(lm)
    vocab = spec.weight.shape[0]
    ids = torch.tensor([[min(1, vocab - 1), min(2, vocab - 1)]], device=lm.get_input_embeddings().weight.device)
    probe: dict[str, torch.Tensor] = {}

    def swap(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        probe["hidden"] = _probe_hidden(hidden, spec)
        if isinstance(output, tuple):
            return (probe["hidden"], *output[1:])
        output.last_hidden_state = probe["hidden"]  # a ModelOutput keeps the attribute and item 0 in sync
        return output

    was_training = lm.training
    handle = lm.get_decoder().register_forward_hook(swap)
    try:
        lm.eval()
        with torch.no_grad():
            logits = lm(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
        lm.train(was_training)
    if "hidden" not in probe:
        raise InputError(f"model {name}: its forward does not call get_decoder(); lowmem-sdpo reads hidden states there")
    with torch.no_grad():
        z, y = spec_logits(spec, probe["hidden"][0])
        got = logits[0].float()
        if got.shape != z.shape:
            raise InputError(
                f"model {name}: forward gives logits {tuple(got.shape)} for hidden states whose head logits are "
                f"{tuple(z.shape)}; suspect config attributes: {_suspects(lm)}"
            )
        eps = max(torch.finfo(spec.weight.dtype).eps, torch.finfo(logits.dtype).eps)
        if spec.weight.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            eps = max(eps, 2.0**-10)  # fp32 matmuls may run in TF32 (10-bit mantissa) on both sides
        tol = PROBE_ROUNDINGS * eps * (1.0 + y.abs().amax(dim=1, keepdim=True))
        excess = ((got - z).abs() - tol).amax()
    if not bool(excess <= 0):
        worst = float((got - z).abs().amax())
        raise InputError(
            f"model {name}: its forward's logits differ from the lm head lowmem-sdpo reads ({spec.describe()}) by "
            f"up to {worst:.3g}; suspect config attributes: {_suspects(lm)}; lowmem-sdpo cannot compute this "
            "model's log-probs"
        )
    return spec
