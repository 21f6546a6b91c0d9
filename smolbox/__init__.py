"""smolbox: DPO fine-tuning of SmolVLM, taken all the way to an ONNX Runtime service."""

import os as _os

__version__ = "0.1.0"

# onnxruntime >= 1.29 uploads usage telemetry unless told not to; smolbox makes no outbound requests.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("ORT_TELEMETRY_DISABLED", "1")

from . import quiet as _quiet  # noqa: E402  (library warnings known to be harmless, silenced at their source)

_quiet.install()
