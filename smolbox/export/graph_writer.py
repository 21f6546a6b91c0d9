"""What the graph writers (fused_decoder, fused_vision, embed_tokens) share: a builder that collects nodes and weights
under readable names (they show in onnxruntime's profiles), and the numbers they use."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_layout import ONNX_FLOAT, OPSET

MASKED = -10000.0  # additive attention bias of a masked key: finite, so a fully masked row stays finite in fp16 too


def to_numpy(tensor) -> np.ndarray:
    """A torch weight as a float32 numpy array (the writer casts it to the graph's dtype)."""
    return tensor.detach().float().cpu().numpy()


class GraphWriter:
    """Collects nodes and initializers of one graph in `dtype` (np.float32 or np.float16)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.elem = ONNX_FLOAT[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray, dtype=None) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype or self.dtype), name))
        return name

    def ints(self, name: str, values) -> str:
        return self.weight(name, np.array(values, np.int64), np.int64)

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, name: str, domain: str = "", **attrs):
        """One node; returns its output name, or the list of them ("" marks an optional output left out)."""
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        named = [o for o in outputs if o]
        return named[0] if len(named) == 1 else named

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        """One node with one output, both called `name`."""
        return self.node(op, inputs, name, name, domain=domain, **attrs)

    def model(self, name: str, inputs: list, outputs: list, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                 producer_name=producer)
