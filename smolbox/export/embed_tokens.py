"""The embed_tokens graph written from the text model's token table: one Gather, `input_ids` -> `inputs_embeds`.

It is the graph torch.onnx traces from an nn.Embedding, node for node, without the tracer: torch.onnx's fixed cost
(its exporter set up per call) was most of a small model's export time (docs/export.md). Tables that are more
than a plain nn.Embedding (a scaled or otherwise wrapped embedding) are traced instead (smolbox.export.graphs).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .graph_writer import GraphWriter, to_numpy


def unsupported_reason(model) -> str | None:
    """Why this model's token table cannot be written by this module (None when it can)."""
    table = model.model.text_model.embed_tokens
    if type(table) is not torch.nn.Embedding:
        return f"the token table is a {type(table).__name__}, not a plain nn.Embedding"
    return None


def build_embed_tokens(model, dtype=np.float32) -> onnx.ModelProto:
    """The embed_tokens graph of `model` (an Idefics3ForConditionalGeneration) with its table in fp32 or fp16."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"the written embed_tokens graph does not support this model: {reason}")
    table = model.model.text_model.embed_tokens.weight
    g = GraphWriter(dtype)
    g.node("Gather", [g.weight("embed_tokens.weight", to_numpy(table)), "input_ids"], "inputs_embeds", "embedding")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("inputs_embeds", g.elem, ["batch_size", "sequence_length", table.shape[1]])]
    return g.model("embed_tokens", inputs, outputs, "smolbox.export.embed_tokens")
