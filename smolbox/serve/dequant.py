"""A prefill decoder with the 4-bit weights of a quantized variant dequantized once, when the server loads.

Why: onnxruntime's MatMulNBits is the fast path for a decode step (a few rows: the weights are read once, 4 bits
each), but a prefill multiplies a whole prompt (a thousand rows and more) by every weight, which cuBLAS does best
on plain half-precision weights. With serve.prefill_dequantized the server keeps a second decoder session for
prefills (SlotVLM), the same derived graph with each MatMulNBits turned back into a MatMul over its weight
dequantized here: the same numbers the quantized kernel computes with (zero point 8 or the graph's own, one scale per
block), so prefill and decode stay one model. It costs the float weights' memory (the text model's size in fp16:
about 3.4 GB at SmolVLM-Instruct's shapes) on the decoder's device.

The weights go to onnxruntime as external initializers (host arrays, which it copies to the decoder's device when
the session starts): a graph with them inline would pass protobuf's 2 GB limit.

No torch here: the serving image runs this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .derive import MS, replace_nodes


@dataclass
class Dequantized:
    model: onnx.ModelProto  # the graph, its new weights declared external (supplied as `weights`)
    weights: dict[str, np.ndarray]  # name -> [K, N] weight in the activations' dtype
    count: int  # MatMulNBits turned into MatMul


def dequantize_matmuls(model: onnx.ModelProto, folder: Path) -> Dequantized:
    """A copy of `model` (a decoder whose external weights live in `folder`) with every 4-bit MatMulNBits without
    bias, g_idx or packed zero points replaced by MatMul over its dequantized weight."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    weights, nodes = {}, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        extra = list(node.input[3:])
        if node.op_type != "MatMulNBits" or node.domain != MS or attrs.get("bits", 4) != 4 or any(extra) \
                or node.input[1] not in initializers or node.input[2] not in initializers:
            nodes.append(node)
            continue
        packed = numpy_helper.to_array(initializers[node.input[1]], base_dir=str(folder))
        scales = numpy_helper.to_array(initializers[node.input[2]], base_dir=str(folder))
        name = node.input[1] + ".dequantized"
        weights[name] = dequantize_4bit(packed, scales, attrs["K"], attrs["N"], attrs["block_size"])
        nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
    replace_nodes(graph, nodes)
    for name, weight in weights.items():
        graph.initializer.append(_external_declaration(name, weight))
    return Dequantized(model, weights, len(weights))


def dequantize_4bit(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block_size: int) -> np.ndarray:
    """MatMulNBits' 4-bit weight as the [K, N] matrix a MatMul takes: `packed` [N, blocks, block_size / 2] holds two
    values a byte, the first in the low nibble; value = (nibble - 8) x the block's scale (`scales` [N, blocks] or
    flat), in the scales' dtype."""
    blocks = packed.shape[1]
    low, high = packed & 0x0F, packed >> 4
    values = np.stack([low, high], axis=-1).reshape(n, blocks, block_size).astype(np.float32) - 8.0
    values *= scales.reshape(n, blocks, 1).astype(np.float32)
    return np.ascontiguousarray(values.reshape(n, blocks * block_size)[:, :k].T.astype(scales.dtype))


def _external_declaration(name: str, weight: np.ndarray) -> onnx.TensorProto:
    """An initializer with no data of its own, marked external: onnxruntime takes its value from the session's
    external initializers (SessionOptions.add_external_initializers)."""
    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(weight.dtype), dims=weight.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "smolbox-dequantized"), ("offset", "0"), ("length", str(weight.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
