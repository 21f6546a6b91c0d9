"""SmolVLM's text decoder as a compact ONNX graph written from the merged weights ("fused" decoder).

torch.onnx traces the Llama decoder into ~75 small nodes per layer (rotary maths, mask building, RMSNorm as
pow/mean/sqrt/div, casts, shape arithmetic). On a GPU each node is a kernel launch: at batch 1 the launches, not
the 1.3 GB of 4-bit weights, set the time per token. This module writes the same function with onnxruntime's
fused operators, 14 nodes per layer:

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)  ->  MatMul q|k|v  ->  Split  ->
    RotaryEmbedding (q, k)  ->  MultiHeadAttention (past/present, additive mask)  ->  MatMul o  ->
    SkipSimplifiedLayerNormalization  ->  MatMul gate|up  ->  Split  ->  SiLU(gate) * up  ->  MatMul down

Interface: the same inputs and present outputs as the traced decoder (the published SmolVLM layout), but
`logits` holds only the last position ([batch, 1, vocab], float32): generation needs nothing else, and a
1,100-token prompt then no longer produces 200 MB of logits. The additive attention mask (causal, offset by the
past length, and the padding of `attention_mask`) is built once and shared by every layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
MASKED = -10000.0  # finite: a fully masked row (a left-padding query) stays finite in fp16 too
_FLOAT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def unsupported_reason(model) -> str | None:
    """Why this model's text decoder cannot be written by this module (None when it can)."""
    text = model.config.text_config
    rotary = getattr(model.model.text_model, "rotary_emb", None)
    if text.model_type != "llama":
        return f"text model type {text.model_type!r} is not llama"
    if text.num_key_value_heads != text.num_attention_heads:
        return "grouped-query attention (fewer key/value heads than query heads)"
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        return "biases in attention or MLP projections"
    if text.hidden_act != "silu":
        return f"activation {text.hidden_act!r}"
    if rotary is None or getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3"):
        return f"rotary embedding type {getattr(rotary, 'rope_type', None)!r} depends on the sequence length"
    return None


class _Graph:
    """Collects nodes and initializers; names stay readable in onnxruntime's profiles."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray, dtype=None) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype or self.dtype), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, name: str, domain: str = "", **attrs):
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        named = [o for o in outputs if o]  # "" marks an optional output left out
        return named[0] if len(named) == 1 else named


def _t(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def build_decoder(model, dtype=np.float32) -> onnx.ModelProto:
    """The decoder_model_merged graph of `model` (an Idefics3ForConditionalGeneration) in fp32 or fp16."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"the fused decoder does not support this model: {reason}")
    text_model, config = model.model.text_model, model.config.text_config
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter, eps = config.intermediate_size, float(config.rms_norm_eps)
    g = _Graph(dtype)
    elem = _FLOAT[dtype]

    # Rotary tables for every position the model supports, taken from the model's own rotary module (so
    # linear / llama3 frequency scaling and its attention scaling carry over).
    rotary = text_model.rotary_emb
    positions = np.arange(config.max_position_embeddings, dtype=np.float64)
    angles = np.outer(positions, rotary.inv_freq.detach().double().cpu().numpy())
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    cos = g.weight("rotary.cos", np.cos(angles) * scaling)
    sin = g.weight("rotary.sin", np.sin(angles) * scaling)

    # Additive mask [batch, 1, new, total]: query i (at absolute position past + i) sees key j when j <= past + i
    # and attention_mask[j] is 1.
    zero = g.weight("mask.zero", np.array(0.0))
    masked = g.weight("mask.masked", np.array(MASKED))
    one = g.weight("const.one", np.array(1, np.int64), np.int64)
    first = g.weight("const.zero", np.array(0, np.int64), np.int64)
    new = g.node("Gather", [g.node("Shape", ["inputs_embeds"], "mask.embeds_shape", "mask.embeds_shape"), one], "mask.new", "mask.new")
    total = g.node("Gather", [g.node("Shape", ["attention_mask"], "mask.mask_shape", "mask.mask_shape"), one], "mask.total", "mask.total")
    past = g.node("Sub", [total, new], "mask.past", "mask.past")
    query_pos = g.node("Unsqueeze", [g.node("Range", [past, total, one], "mask.query_range", "mask.query_range"),
                                     g.weight("axes.last", np.array([1], np.int64), np.int64)], "mask.query_pos", "mask.query_pos")
    key_pos = g.node("Range", [first, total, one], "mask.key_pos", "mask.key_pos")
    causal = g.node("LessOrEqual", [key_pos, query_pos], "mask.causal", "mask.causal")
    real = g.node("Unsqueeze", [g.node("Cast", ["attention_mask"], "mask.real_keys", "mask.real_keys", to=TensorProto.BOOL),
                                g.weight("axes.heads_queries", np.array([1, 2], np.int64), np.int64)], "mask.real", "mask.real")
    allowed = g.node("And", [causal, real], "mask.allowed", "mask.allowed")
    bias = g.node("Where", [allowed, zero, masked], "mask.bias", "mask.bias")

    split_qkv = g.weight("split.qkv", np.array([hidden, hidden, hidden], np.int64), np.int64)
    split_mlp = g.weight("split.mlp", np.array([inter, inter], np.int64), np.int64)
    inputs = [helper.make_tensor_value_info("inputs_embeds", elem, ["batch_size", "sequence_length", hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = []
    residual, mlp_out = "inputs_embeds", None
    for i, layer in enumerate(text_model.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        norm_in = g.weight(f"{p}.input_layernorm.weight", _t(layer.input_layernorm.weight))
        if mlp_out is None:
            normed = g.node("SimplifiedLayerNormalization", [residual, norm_in], f"{p}.input_norm", f"{p}.input_norm",
                            axis=-1, epsilon=eps, stash_type=1)
        else:  # the previous layer's MLP output joins the residual stream here
            normed, residual = g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, norm_in],
                                      [f"{p}.input_norm", "", "", f"{p}.residual_in"], f"{p}.input_norm",
                                      domain="com.microsoft", epsilon=eps)
        qkv_weight = np.concatenate([_t(attn.q_proj.weight).T, _t(attn.k_proj.weight).T, _t(attn.v_proj.weight).T], axis=1)
        qkv = g.node("MatMul", [normed, g.weight(f"{p}.qkv_proj.weight", qkv_weight)], f"{p}.qkv", f"{p}.qkv_proj")
        q, k, v = g.node("Split", [qkv, split_qkv], [f"{p}.q", f"{p}.k", f"{p}.v"], f"{p}.split_qkv", axis=-1)
        q = g.node("RotaryEmbedding", [q, "position_ids", cos, sin], f"{p}.q_rot", f"{p}.rotary_q", domain="com.microsoft", num_heads=heads)
        k = g.node("RotaryEmbedding", [k, "position_ids", cos, sin], f"{p}.k_rot", f"{p}.rotary_k", domain="com.microsoft", num_heads=heads)
        past_key, past_value = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_key, present_value = f"present.{i}.key", f"present.{i}.value"
        for name in (past_key, past_value):
            inputs.append(helper.make_tensor_value_info(name, elem, ["batch_size", heads, "past_sequence_length", head_dim]))
        for name in (present_key, present_value):
            outputs.append(helper.make_tensor_value_info(name, elem, ["batch_size", heads, "total_sequence_length", head_dim]))
        context = g.node("MultiHeadAttention", [q, k, v, "", "", bias, past_key, past_value],
                         [f"{p}.context", present_key, present_value], f"{p}.attention", domain="com.microsoft", num_heads=heads)[0]
        attn_out = g.node("MatMul", [context, g.weight(f"{p}.o_proj.weight", _t(attn.o_proj.weight).T)], f"{p}.attn_out", f"{p}.o_proj")
        norm_post = g.weight(f"{p}.post_attention_layernorm.weight", _t(layer.post_attention_layernorm.weight))
        normed, residual = g.node("SkipSimplifiedLayerNormalization", [attn_out, residual, norm_post],
                                  [f"{p}.post_norm", "", "", f"{p}.residual_mid"], f"{p}.post_norm", domain="com.microsoft", epsilon=eps)
        gate_up_weight = np.concatenate([_t(mlp.gate_proj.weight).T, _t(mlp.up_proj.weight).T], axis=1)
        gate_up = g.node("MatMul", [normed, g.weight(f"{p}.gate_up_proj.weight", gate_up_weight)], f"{p}.gate_up", f"{p}.gate_up_proj")
        gate, up = g.node("Split", [gate_up, split_mlp], [f"{p}.gate", f"{p}.up"], f"{p}.split_mlp", axis=-1)
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}.gate_sigmoid", f"{p}.gate_sigmoid")], f"{p}.gate_silu", f"{p}.gate_silu")
        act = g.node("Mul", [silu, up], f"{p}.act", f"{p}.act")
        mlp_out = g.node("MatMul", [act, g.weight(f"{p}.down_proj.weight", _t(mlp.down_proj.weight).T)], f"{p}.mlp_out", f"{p}.down_proj")

    # Only the last position goes through the final norm and the LM head (left padding puts every row's newest
    # token there).
    starts, ends = g.weight("slice.last_start", np.array([-1], np.int64), np.int64), g.weight("slice.last_end", np.array([2**62], np.int64), np.int64)
    axis = g.weight("slice.axis", np.array([1], np.int64), np.int64)
    last_mlp = g.node("Slice", [mlp_out, starts, ends, axis], "last.mlp_out", "last.mlp_out")
    last_residual = g.node("Slice", [residual, starts, ends, axis], "last.residual", "last.residual")
    final = g.node("SkipSimplifiedLayerNormalization", [last_mlp, last_residual, g.weight("norm.weight", _t(text_model.norm.weight))],
                   ["last.normed", "", "", ""], "final_norm", domain="com.microsoft", epsilon=eps)
    logits = g.node("MatMul", [final, g.weight("lm_head.weight", _t(model.lm_head.weight).T)],
                    "logits" if dtype == np.float32 else "logits.half", "lm_head")
    if dtype != np.float32:
        g.node("Cast", [logits], "logits", "logits.float", to=TensorProto.FLOAT)
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, config.vocab_size]))
    # Order the past inputs as the traced graph does: all of layer 0 (key, value), then layer 1, ...
    graph = helper.make_graph(g.nodes, "decoder_model_merged", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="smolbox.onnx_decoder")
    return proto
