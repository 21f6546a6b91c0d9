"""Library noise smolbox silences where it starts: each entry is one exact message from one module, with why it
is harmless. Nothing is hidden wholesale; anything else a library says still shows.

`install()` runs when smolbox is imported; tests/conftest.py hands the same warning filters to pytest, which resets
warning filters around every test.
"""

from __future__ import annotations

import logging
import warnings

# (category, start of the message (a regex), module the warning is attributed to (a regex), why it is harmless)
WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils",
     "peft 0.21 (PeftModel.__init__) and TRL 1.16 still read transformers 5.23's old property name; the value is right"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script",
     "torch 2.13's own torch.utils.mkldnn uses it at import, pulled in by bitsandbytes' torch.compile; smolbox scripts nothing"),
]

# bitsandbytes 0.50.2 on AVX512-BF16 CPUs tries to fetch a faster CPU kernel from the hub through the optional
# `kernels` package when it is imported, and logs a warning when it cannot; it then uses its own kernel, which is
# the one smolbox trains with anyway (smolbox.models turns the AVX512-BF16 repacking off).
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    for category, message, module, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_MESSAGE))


def pytest_filters() -> list[str]:
    """The same filters in pytest's `filterwarnings` syntax (action:message:category:module)."""
    return [f"ignore:{message}:{category.__name__}:{module}" for category, message, module, _why in WARNINGS]
