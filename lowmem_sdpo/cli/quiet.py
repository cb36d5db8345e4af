"""A quiet terminal: the dependency chatter a user cannot act on is kept off it unless --debug.

Configured once per process by `main`, through the standard logging levels and warnings filters of the named
sources below (nothing in the libraries is patched). Each entry says what it silences and why it is noise.
"""

from __future__ import annotations

import logging
import warnings

# Loggers set to ERROR: their warnings are about optional accelerations, not about the user's run.
NOISY_LOGGERS: dict[str, str] = {
    # "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels", logged when
    # bitsandbytes is imported on a CPU with AVX512-BF16: an optional kernel package we do not use.
    "bitsandbytes": "optional CPU kernel package missing",
}
# Warning messages (regular expressions matched from the start) that are ignored.
NOISY_WARNINGS: dict[str, str] = {
    # torch, on bitsandbytes' CPU inference path (gemv_4bit) that models.quant keeps training off; the
    # no-grad passes that do take it never backprop.
    r".*an autograd kernel was not registered to the Autograd key": "bitsandbytes gemv_4bit has no autograd",
}


def quiet_dependencies() -> None:
    """Silence NOISY_LOGGERS and NOISY_WARNINGS for this process (call before the libraries are imported:
    bitsandbytes logs at import)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
