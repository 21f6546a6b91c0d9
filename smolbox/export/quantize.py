"""The quantized variants, derived from the float graphs: q8 / q4 (MatMulNBits weight-only, block-wise), q4f16 (q4
of the fp16 graphs) and int8 (dynamic quantization, CPU only)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from ..onnx_layout import GRAPHS, graph_path
from .errors import ExportError
from .onnx_files import quiet_exporter, save_onnx


def build_variant(onnx_dir: Path, variant: str, block_size: int) -> None:
    """Derive one quantized variant of all three graphs from the fp32 ones (q4f16: from the fp16 ones)."""
    for graph in GRAPHS:
        source = graph_path(onnx_dir.parent, graph, "fp16" if variant == "q4f16" else "fp32")
        target = graph_path(onnx_dir.parent, graph, variant)
        if variant in ("q4", "q4f16", "q8"):
            save_onnx(weight_only(onnx.load(str(source)), 8 if variant == "q8" else 4, block_size, graph), target)
        elif variant == "int8":
            dynamic_int8(source, target, graph)
        else:
            raise ExportError(f"unknown export variant {variant!r}")


def weight_only(proto: onnx.ModelProto, bits: int, block_size: int, graph: str) -> onnx.ModelProto:
    """MatMul weights (and, at 4 bits, the embedding table) quantized block-wise by onnxruntime's MatMulNBitsQuantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The embedding table is a Gather: at 4 bits quantize it block-wise too (GatherBlockQuantized, 4-bit only).
    if graph == "embed_tokens" and bits != 4:
        return proto
    ops = ("Gather",) if graph == "embed_tokens" else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=bits, op_types_to_quantize=ops, quant_axes=(("Gather", 1), ("MatMul", 0)),
    )
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True, algo_config=config,
                                     op_types_to_quantize=ops, quant_axes=(("Gather", 1), ("MatMul", 0)))
    with quiet_exporter():
        quantizer.process()
    return quantizer.model.model


def dynamic_int8(source: Path, target: Path, graph: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if graph == "embed_tokens":  # no MatMul to quantize; the published _int8 sets carry the table as it is
        save_onnx(onnx.load(str(source)), target)
        return
    # quantize_dynamic re-runs ONNX shape inference, which disagrees with the exporter's recorded value_info on
    # the vision graph's bucketize boundaries (Range: 27 inferred, 26 recorded for SmolVLM's 27 patches per side)
    # and fails. Quantize a copy without the recorded intermediate shapes; it sits beside the source so its
    # external weights resolve without being copied.
    graph_only = onnx.load(str(source), load_external_data=False)
    del graph_only.graph.value_info[:]
    stripped = source.with_name(f".{source.stem}.int8-source.onnx")
    onnx.save_model(graph_only, str(stripped))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / target.name
            with quiet_exporter():
                # DefaultTensorType: shape inference stops at onnxruntime's own operators (the fused graphs').
                quantize_dynamic(str(stripped), str(scratch), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 use_external_data_format=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            save_onnx(onnx.load(str(scratch)), target)
    finally:
        stripped.unlink(missing_ok=True)
