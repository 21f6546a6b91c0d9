"""The server's own decoder form, derived from the export's fused decoder graph when the server loads: GroupQueryAttention
over one fixed-capacity KV buffer per layer (smolbox.serve.kv_decoder runs it, a slot per row).

Why: the published decoder (smolbox.export.fused_decoder, HF's SmolVLM layout) runs MultiHeadAttention, which
takes a past of the batch's length and returns a new, one token longer present: every step copies the whole cache,
and a request joining or leaving a running batch copies it again (padding surgery, runtime.OnnxVLM.merge/select).
Shapes change every step, so CUDA graphs cannot replay it (docs/benchmarks.md, "What stands in the way of the
serving targets"). onnxruntime's com.microsoft GroupQueryAttention appends to a buffer of fixed capacity in place
when the same memory is bound as its past input and its present output, and tells rows of different lengths apart
by `seqlens_k` (tokens so far - 1, per row). A row owns one slot of that buffer: joining is a prefill into a free
slot, leaving frees the slot, and nothing is copied.

The export folder stays as it is (users and transformers.js load decoder_model_merged*.onnx): the server derives
this form from the fused graph when it loads, by graph surgery over the ModelProto (`derive`): per layer the
q|k|v projection's output (MatMul, MatMulNBits or int8's dequantized product: whatever feeds the Split) becomes
GroupQueryAttention's packed input, Split / RotaryEmbedding / MultiHeadAttention and the additive mask go, rotary
happens inside (do_rotary=1, the graph's own cos/sin tables), and `seqlens_k` / `total_sequence_length` replace
`attention_mask` / `position_ids`. The fused graph's head keeps only the last position; here an input `last_index`
says which position per row (GatherND), so several newcomers prefill in one call: the rows whose free slots are
consecutive bind as one view and go right-padded to the longest, each row from position 0 of its slot (a batch of
prompts is GroupQueryAttention's first-prompt case: total_sequence_length = the padded length, `seqlens_k` = each
row's length - 1), and take their logits at their own last token; a decode step binds 0. A decoder that cannot be
derived (a traced one) keeps today's runtime; `load_runtime` logs why.

The derived graph also returns each row's argmax (`next_token`, an ArgMax after the head): a decode step of greedy
rows copies [rows] token ids to the host, not [rows, vocabulary] float32 logits to be argmaxed there; a step's logits
are copied only when read (a sampling row), before that bucket's next step overwrites its buffer (SlotStep).

The vision encoder gets a second form (`vision_without_mask`): the same graph with MultiHeadAttention's additive
mask left out, which the server runs for tiles with no padding (every patch real: the split tiles and the squared
global image SmolVLM makes of a large image), where that mask is all zeros anyway. Without a mask onnxruntime's
attention needs no [tiles, 1, patches, patches] bias and picks faster kernels, which shortens a 13-tile image's
encoding on the H200 (docs/benchmarks.md, 2026-12-01 lease 9, "The vision encoder alone"). Tiles with padding keep
the export's graph.

No torch here: the serving image runs this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_layout import PAST, PRESENT

MS = "com.microsoft"
LAST_INDEX = "last_index"  # derived decoder input: per row, the position whose logits to return (0 in a decode step)
NEXT_TOKEN = "next_token"  # derived decoder output: per row, the argmax of its logits (the greedy token)


class NotDerivable(ValueError):
    """The decoder graph is not the fused form this module rewrites."""


@dataclass
class Derived:
    model: onnx.ModelProto
    layers: int
    heads: int
    head_dim: int
    positions: int  # rows of the rotary tables: no slot may hold more tokens
    half: bool  # fp16 activations and caches (fp16, q4f16)


def derive(model: onnx.ModelProto) -> Derived:
    """The GroupQueryAttention form of a fused decoder graph (changed in place; external weights stay external).
    Raises NotDerivable with the reason when the graph is not smolbox.export.fused_decoder's (or its quantized
    variants')."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output if out}
    initializers = {t.name: t for t in graph.initializer}
    past_types = {i.name: i.type.tensor_type for i in graph.input if i.name.startswith(PAST)}
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS]
    if not attention:
        raise NotDerivable("no MultiHeadAttention node (not a fused decoder)")
    logits = next((o for o in graph.output if o.name == "logits"), None)
    if logits is None or logits.type.tensor_type.shape.dim[1].dim_value != 1:
        raise NotDerivable("logits are not the last position only")
    replaced, dropped, heads, head_dim, positions = {}, set(), None, None, None
    for node in attention:
        if len(node.input) < 8 or not node.input[6] or not node.input[7] or len(node.output) < 3:
            raise NotDerivable(f"{node.name}: no past/present")
        rotary_q, rotary_k = producer.get(node.input[0]), producer.get(node.input[1])
        if not all(r is not None and r.op_type == "RotaryEmbedding" and r.domain == MS for r in (rotary_q, rotary_k)):
            raise NotDerivable(f"{node.name}: query and key do not come from RotaryEmbedding")
        split = producer.get(rotary_q.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != [rotary_q.input[0], rotary_k.input[0], node.input[2]]:
            raise NotDerivable(f"{node.name}: q, k, v are not one Split of a packed projection")
        rotary = [_attrs(r) for r in (rotary_q, rotary_k)]
        if rotary[0] != rotary[1] or rotary[0].get("rotary_embedding_dim", 0) or rotary[0].get("is_packed_batching", 0) \
                or rotary[0].get("scale", 1.0) != 1.0 or list(rotary_q.input[2:4]) != list(rotary_k.input[2:4]):
            raise NotDerivable(f"{node.name}: rotary settings GroupQueryAttention does not have")
        cos, sin = rotary_q.input[2], rotary_q.input[3]
        cache = past_types.get(node.input[6])
        if cos not in initializers or sin not in initializers or cache is None:
            raise NotDerivable(f"{node.name}: rotary tables are not initializers")
        if not initializers[cos].data_type == initializers[sin].data_type == cache.elem_type:
            raise NotDerivable(f"{node.name}: rotary tables and KV cache differ in dtype")
        num_heads = _attrs(node)["num_heads"]
        dim = cache.shape.dim[3].dim_value
        sizes_name = split.input[1] if len(split.input) > 1 else ""
        sizes = numpy_helper.to_array(initializers[sizes_name]).tolist() if sizes_name in initializers else None
        if sizes != [num_heads * dim] * 3 or cache.shape.dim[1].dim_value != num_heads:
            raise NotDerivable(f"{node.name}: q, k, v are not {num_heads} heads of {dim} each")
        heads, head_dim = num_heads, dim
        rows = initializers[cos].dims[0]
        positions = rows if positions is None else min(positions, rows)
        attrs = {"num_heads": num_heads, "kv_num_heads": num_heads, "do_rotary": 1,
                 "rotary_interleaved": rotary[0].get("interleaved", 0)}
        if "scale" in _attrs(node):
            attrs["scale"] = _attrs(node)["scale"]
        replaced[node.name] = helper.make_node(
            "GroupQueryAttention", [split.input[0], "", "", node.input[6], node.input[7], "seqlens_k", "total_sequence_length", cos, sin],
            list(node.output[:3]), name=node.name, domain=MS, **attrs)
        dropped.update(id(n) for n in (split, rotary_q, rotary_k))
    nodes = [replaced.get(n.name, n) if n.op_type == "MultiHeadAttention" else n for n in graph.node if id(n) not in dropped]
    nodes = _gather_last(nodes, producer, initializers, graph)
    nodes = _live(nodes, {o.name for o in graph.output})
    # Each row's greedy token on the device: a decode step of greedy rows copies [rows] int64 to the host instead of
    # [rows, vocabulary] float32 logits, and the host does no argmax over them (NEXT_TOKEN).
    nodes.append(helper.make_node("ArgMax", ["logits"], [NEXT_TOKEN], name="next_token", axis=-1, keepdims=0))
    graph.output.append(helper.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, ["batch_size", 1]))
    used = {name for n in nodes for name in n.input}
    for name in ("attention_mask", "position_ids"):
        if name in used:
            raise NotDerivable(f"{name} is used outside the attention mask and rotary")
    replace_nodes(graph, nodes)
    inputs = [i for i in graph.input if i.name not in ("attention_mask", "position_ids")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
               helper.make_tensor_value_info(LAST_INDEX, TensorProto.INT64, ["batch_size"])]
    del graph.input[:]
    graph.input.extend(inputs)
    for value in [*graph.input, *graph.output]:  # past and present are the same buffer: its capacity
        if value.name.startswith((PAST, PRESENT)):
            value.type.tensor_type.shape.dim[2].Clear()
            value.type.tensor_type.shape.dim[2].dim_param = "kv_capacity"
    produced = {o for n in nodes for o in n.output}
    value_info = [v for v in graph.value_info if v.name in produced and not v.name.startswith(PRESENT)]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    half = next(iter(past_types.values())).elem_type == TensorProto.FLOAT16
    return Derived(model, len(attention), heads, head_dim, positions, half)


def _gather_last(nodes: list, producer: dict, initializers: dict, graph) -> list:
    """The fused graph keeps each row's last position (`Slice` [-1:] of the last layer's output and residual, before
    the final norm and the head), which is each row's newest token when rows are left-padded or alone. Here each
    row's position comes from the input `last_index` instead (GatherND, batch_dims=1): a prefill of right-padded rows
    of different lengths gives each row's logits at its own last token, and a decode step (one position) binds 0."""
    head = [n for n in nodes if n.op_type == "SkipSimplifiedLayerNormalization" and n.domain == MS
            and all(producer.get(i) is not None and producer[i].op_type == "Slice" for i in n.input[:2])]
    if len(head) != 1:
        raise NotDerivable("no final norm over two last-position Slices")
    slices = {id(producer[i]): producer[i] for i in head[0].input[:2]}
    for node in slices.values():
        bounds = [numpy_helper.to_array(initializers[i]).tolist() if i in initializers else None for i in node.input[1:4]]
        if bounds[0] != [-1] or bounds[2] != [1]:
            raise NotDerivable(f"{node.name}: not the last position of axis 1")
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "last_index.axis1"))
    index = helper.make_node("Unsqueeze", [LAST_INDEX, "last_index.axis1"], ["last_index.nd"], name="last_index.nd")
    out = [index]
    for node in nodes:
        if id(node) not in slices:
            out.append(node)
            continue
        gathered = node.output[0] + ".gathered"
        out += [helper.make_node("GatherND", [node.input[0], "last_index.nd"], [gathered], name=node.name + ".gather", batch_dims=1),
                helper.make_node("Unsqueeze", [gathered, "last_index.axis1"], [node.output[0]], name=node.name + ".unsqueeze")]
    return out


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` without those whose outputs nothing reads (the mask builder once no attention reads the mask)."""
    while True:
        read = outputs | {name for n in nodes for name in n.input}
        live = [n for n in nodes if any(o and o in read for o in n.output)]
        if len(live) == len(nodes):
            return nodes
        nodes = live


def vision_without_mask(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of the vision encoder `model` whose MultiHeadAttention nodes take no attention bias, without the nodes
    that only made it; None when no MultiHeadAttention takes one (nothing to gain)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, changed = model.graph, False
    for node in graph.node:
        if node.op_type == "MultiHeadAttention" and node.domain == MS and len(node.input) > 5 and node.input[5]:
            del node.input[5:]
            changed = True
    if not changed:
        return None
    replace_nodes(graph, _live(list(graph.node), {o.name for o in graph.output}))
    return model


def replace_nodes(graph: onnx.GraphProto, nodes: list) -> None:
    """`graph`'s nodes become `nodes`; initializers that no node reads any more go."""
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for n in nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
