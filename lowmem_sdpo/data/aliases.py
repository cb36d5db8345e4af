"""Short names for the public preference datasets users reach for (`lowmem-sdpo data aliases`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetAlias:
    name: str
    hub_id: str
    split: str  # the split used when the step spec names none
    kind: str  # "pairs" or "unpaired"
    note: str


DATASET_ALIASES: dict[str, DatasetAlias] = {
    a.name: a
    for a in (
        DatasetAlias("openorca", "Intel/orca_dpo_pairs", "train", "pairs", "sDPO step 1 (~12.9K pairs)"),
        DatasetAlias(
            "ultrafeedback",
            "allenai/ultrafeedback_binarized_cleaned",
            "train_prefs",
            "pairs",
            "sDPO step 2 (~60.8K pairs)",
        ),
        DatasetAlias(
            "ultrafeedback-h4",
            "HuggingFaceH4/ultrafeedback_binarized",
            "train_prefs",
            "pairs",
            "Zephyr's UltraFeedback (~61.1K pairs)",
        ),
        DatasetAlias(
            "beavertails", "PKU-Alignment/BeaverTails", "30k_train", "unpaired", "is_safe = desirable"
        ),
        DatasetAlias(
            "helpsteer", "nvidia/HelpSteer", "train", "unpaired", "helpfulness >= threshold = desirable"
        ),
    )
}
