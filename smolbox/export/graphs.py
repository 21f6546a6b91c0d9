"""The three graphs of one float variant (vision_encoder, embed_tokens, decoder_model_merged), each written by
smolbox's graph writers where the model allows it (export.decoder / export.vision; embed_tokens whenever its table
is a plain nn.Embedding) or traced by torch.onnx."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from ..onnx_layout import graph_path
from . import embed_tokens, fused_decoder, fused_vision
from .errors import ExportError
from .onnx_files import published_io, save_onnx
from .parity import parity_inputs
from .traced import traced_decoder, traced_embeddings, traced_vision

log = logging.getLogger("smolbox.export")

# Graphs that can be written with onnxruntime's fused operators instead of traced: export.<part> picks.
FUSABLE = {"decoder": fused_decoder, "vision": fused_vision}


def graph_kind(model, part: str, choice: str) -> str:
    """'fused' (FUSABLE[part]) or 'traced' (torch.onnx) for export.decoder / export.vision = auto / fused / traced."""
    reason = FUSABLE[part].unsupported_reason(model)
    if choice == "fused" and reason:
        raise ExportError(f"export.{part}=fused does not support this model ({reason}): set export.{part}=traced or auto")
    if choice == "auto" and reason:
        log.info("export: %s traced with torch.onnx (the fused %s graph does not support %s)", part, part, reason)
    return "traced" if choice == "traced" or reason else "fused"


def export_onnx(model, processor, onnx_dir: Path, variant: str = "fp32", fused_decoder: bool = False,
                fused_vision: bool = False) -> None:
    """The three graphs of one float variant, with dynamic batch, image count, image size and sequence dimensions.

    fp16 is traced from a half-precision copy of the model: onnxruntime's fp32->fp16 graph converter writes
    duplicate Cast names on torch.onnx's graphs, which onnxruntime then rejects. With `fused_decoder` the decoder
    is written by smolbox.export.fused_decoder instead of traced, with `fused_vision` the vision encoder by
    smolbox.export.fused_vision.
    """
    onnx_dir.mkdir(parents=True, exist_ok=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[variant]
    if variant != "fp32":
        model = copy.deepcopy(model).to(dtype)

    def save(proto, graph: str) -> None:
        save_onnx(published_io(proto), graph_path(onnx_dir.parent, graph, variant))

    inputs = parity_inputs(processor, 1)[0]
    float_type = np.float16 if variant == "fp16" else np.float32  # of the fused graphs
    if fused_vision:
        save(FUSABLE["vision"].build_vision_encoder(model, float_type), "vision_encoder")
    else:
        save(traced_vision(model, inputs["pixel_values"].to(dtype), inputs["pixel_attention_mask"].bool()), "vision_encoder")
    table_reason = embed_tokens.unsupported_reason(model)
    if table_reason:
        log.info("export: embed_tokens traced with torch.onnx (%s)", table_reason)
        save(traced_embeddings(model, inputs["input_ids"]), "embed_tokens")
    else:
        save(embed_tokens.build_embed_tokens(model, float_type), "embed_tokens")
    if fused_decoder:
        save(FUSABLE["decoder"].build_decoder(model, float_type), "decoder_model_merged")
    else:
        save(traced_decoder(model, dtype), "decoder_model_merged")
