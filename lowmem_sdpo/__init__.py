"""lowmem-sdpo: stepwise DPO (sDPO, Kim et al. 2024) on one consumer GPU."""

__version__ = "0.1.0"
