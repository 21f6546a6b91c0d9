"""ONNX files as the export writes them: external weights beside each graph, the published float32 boundary of the
float16 graphs, the weight bytes of a graph, and quiet exporters."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import onnx.numpy_helper

from ..onnx_layout import IR_VERSION, PAST, PRESENT


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Weights over 1 KiB go to <file>.onnx_data beside the graph, as in the published SmolVLM ONNX folders."""
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def weight_bytes(path: Path) -> int:
    """Bytes of all initializers of a graph, inside the .onnx file or in its external data."""
    total = 0
    for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        total += int(external["length"]) if "length" in external else len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


def published_io(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 at the graph boundary except the KV cache, as in HF's published SmolVLM `_fp16` / `_q4f16` files.

    transformers.js feeds its processor's float32 `pixel_values` to every variant, copies float32 `image_features`
    into the embeddings without a cast and takes the KV cache dtype from config.json (`kv_cache_dtype`) or the
    graph's declared inputs: a float16 graph gets Cast nodes on its float16 inputs and outputs, past_key_values.* /
    present.* excepted (the KV cache keeps the graph's own precision). A float32 graph is returned unchanged. The
    proto is changed in place.
    """
    graph, half = proto.graph, onnx.TensorProto.FLOAT16
    renames, head, tail = {}, [], []
    for value in graph.input:
        tensor = value.type.tensor_type
        if tensor.elem_type == half and not value.name.startswith((PAST, PRESENT)):
            inner = renames[value.name] = f"{value.name}.float16"
            head.append(onnx.helper.make_node("Cast", [value.name], [inner], name=f"{value.name}.to_float16", to=half))
            tensor.elem_type = onnx.TensorProto.FLOAT
    for value in graph.output:
        tensor = value.type.tensor_type
        if tensor.elem_type == half and not value.name.startswith((PAST, PRESENT)):
            inner = renames[value.name] = f"{value.name}.float16"
            tail.append(onnx.helper.make_node("Cast", [inner], [value.name], name=f"{value.name}.to_float32", to=onnx.TensorProto.FLOAT))
            tensor.elem_type = onnx.TensorProto.FLOAT
    if not renames:
        return proto
    _rename_tensors(graph, renames)
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _rename_tensors(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Every use and definition of the renamed tensors inside the graph (and subgraphs reading them), not the
    graph's own inputs and outputs."""
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _rename_tensors(sub, renames)
    for info in graph.value_info:
        info.name = renames.get(info.name, info.name)


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx and the ORT quantizers print a line per pass; keep the console to the export's progress lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxruntime", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
