"""The ONNX side of an export folder, as the exporter writes it and the runtime reads it: the graph files and
their variant suffixes, the opset and IR version, the KV-cache names and the dtypes at the graph boundary.

numpy, onnx's enums and onnxruntime's type strings only: the serving image imports this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto

# Published SmolVLM ONNX suffixes, keyed by transformers.js's dtype names (its DEFAULT_DTYPE_SUFFIX_MAPPING).
VARIANT_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")

OPSET = 18  # the default domain's opset of every graph smolbox writes (com.microsoft: 1)
IR_VERSION = 10  # onnxruntime <= 1.31 loads IR <= 13; 10 is what current exporters write
TO_THE_END = 2**62  # a Slice end past any length

PAST, PRESENT = "past_key_values.", "present."  # the decoder's KV-cache inputs and outputs: past_key_values.{i}.key ...

# dtypes: numpy <-> onnx element types, and onnxruntime's input type strings -> numpy
ONNX_FLOAT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def graph_path(folder: Path, graph: str, variant: str) -> Path:
    return Path(folder) / "onnx" / f"{graph}{VARIANT_SUFFIX[variant]}.onnx"


def available_variants(folder: Path) -> list[str]:
    """The variants whose three graphs are all in the export folder, in VARIANT_SUFFIX's order."""
    return [v for v in VARIANT_SUFFIX if all(graph_path(folder, g, v).is_file() for g in GRAPHS)]
