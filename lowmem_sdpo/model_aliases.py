"""Model aliases: short names users type for `--model`.

`solar-10.7b-sft` points at Upstage's public instruction-tuned SOLAR-10.7B. The paper's own SFT
checkpoint (SOLAR-10.7B + SFT, Kim et al. 2024) was not released; the Instruct model is the
closest public stand-in (same base, same `### User:`/`### Assistant:` template).
`tiny` is the embedded demo model (built locally, see lowmem_sdpo.models.tiny).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelAlias:
    name: str
    target: str  # a hub id, or "builtin:tiny" for the embedded model
    note: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            "solar-10.7b-sft",
            "upstage/SOLAR-10.7B-Instruct-v1.0",
            "public SOLAR-10.7B instruction-tuned model; the paper's own SFT checkpoint is unreleased",
        ),
        ModelAlias("tiny", "builtin:tiny", "embedded few-million-parameter Llama for the CPU demo"),
    )
}


def resolve_model_alias(name: str) -> str:
    """Return the hub id / local path / builtin target that `name` stands for."""
    alias = MODEL_ALIASES.get(name)
    return alias.target if alias else name
