"""SmolVLM's text decoder as a compact ONNX graph written from the merged weights ("fused" decoder).

torch.onnx traces the Llama decoder into ~75 small nodes per layer (rotary maths, mask building, RMSNorm as
pow/mean/sqrt/div, casts, shape arithmetic). On a GPU each node is a kernel launch: at batch 1 the launches, not
the weights, set the time per token (docs/benchmarks.md). This module writes the same function with
onnxruntime's fused operators, 14 nodes per layer:

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)  ->  MatMul q|k|v  ->  Split  ->
    RotaryEmbedding (q, k)  ->  MultiHeadAttention (past/present, additive mask)  ->  MatMul o  ->
    SkipSimplifiedLayerNormalization  ->  MatMul gate|up  ->  Split  ->  SiLU(gate) * up  ->  MatMul down

Interface: the same inputs and present outputs as the traced decoder (the published SmolVLM layout), but
`logits` holds only the last position ([batch, 1, vocab], float32): generation needs nothing else, and a long
prompt then no longer produces a full sequence of logits. The additive attention mask (causal, offset by the past
length, and the padding of `attention_mask`) is built once and shared by every layer. One method per block
(rotary tables, mask, attention, MLP, head), in the order the graph runs them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..onnx_layout import PAST, PRESENT, TO_THE_END
from .graph_writer import MASKED, GraphWriter, to_numpy


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


def build_decoder(model, dtype=np.float32) -> onnx.ModelProto:
    """The decoder_model_merged graph of `model` (an Idefics3ForConditionalGeneration) in fp32 or fp16."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"the fused decoder does not support this model: {reason}")
    return _Decoder(model, dtype).build()


class _Decoder:
    def __init__(self, model, dtype):
        self.model, self.text_model, self.config = model, model.model.text_model, model.config.text_config
        config = self.config
        self.heads, self.hidden = config.num_attention_heads, config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.eps = float(config.rms_norm_eps)
        self.g = GraphWriter(dtype)
        self.inputs = [helper.make_tensor_value_info("inputs_embeds", self.g.elem, ["batch_size", "sequence_length", self.hidden]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
                       helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        self.outputs: list = []

    def build(self) -> onnx.ModelProto:
        g = self.g
        self.cos, self.sin = self.rotary_tables()
        self.bias = self.attention_bias()
        self.split_qkv = g.ints("split.qkv", [self.hidden] * 3)
        self.split_mlp = g.ints("split.mlp", [self.config.intermediate_size] * 2)
        residual, mlp_out = "inputs_embeds", None
        for i, layer in enumerate(self.text_model.layers):
            p = f"layers.{i}"
            norm_in = g.weight(f"{p}.input_layernorm.weight", to_numpy(layer.input_layernorm.weight))
            if mlp_out is None:
                normed = g.node("SimplifiedLayerNormalization", [residual, norm_in], f"{p}.input_norm", f"{p}.input_norm",
                                axis=-1, epsilon=self.eps, stash_type=1)
            else:  # the previous layer's MLP output joins the residual stream here
                normed, residual = g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, norm_in],
                                          [f"{p}.input_norm", "", "", f"{p}.residual_in"], f"{p}.input_norm",
                                          domain="com.microsoft", epsilon=self.eps)
            attn_out = self.attention(i, layer.self_attn, normed)
            norm_post = g.weight(f"{p}.post_attention_layernorm.weight", to_numpy(layer.post_attention_layernorm.weight))
            normed, residual = g.node("SkipSimplifiedLayerNormalization", [attn_out, residual, norm_post],
                                      [f"{p}.post_norm", "", "", f"{p}.residual_mid"], f"{p}.post_norm", domain="com.microsoft",
                                      epsilon=self.eps)
            mlp_out = self.mlp(p, layer.mlp, normed)
        self.head(mlp_out, residual)
        # The past inputs are ordered as in the traced graph: all of layer 0 (key, value), then layer 1, ...
        return g.model("decoder_model_merged", self.inputs, self.outputs, "smolbox.export.fused_decoder")

    def rotary_tables(self) -> tuple[str, str]:
        """cos and sin for every position the model supports, from the model's own rotary module (so linear /
        llama3 frequency scaling and its attention scaling carry over)."""
        rotary = self.text_model.rotary_emb
        positions = np.arange(self.config.max_position_embeddings, dtype=np.float64)
        angles = np.outer(positions, rotary.inv_freq.detach().double().cpu().numpy())
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        return self.g.weight("rotary.cos", np.cos(angles) * scaling), self.g.weight("rotary.sin", np.sin(angles) * scaling)

    def attention_bias(self) -> str:
        """Additive mask [batch, 1, new, total]: query i (at absolute position past + i) sees key j when
        j <= past + i and attention_mask[j] is 1."""
        g = self.g
        zero = g.weight("mask.zero", np.array(0.0))
        masked = g.weight("mask.masked", np.array(MASKED))
        one = g.weight("const.one", np.array(1, np.int64), np.int64)
        first = g.weight("const.zero", np.array(0, np.int64), np.int64)
        new = g.node("Gather", [g.op("Shape", ["inputs_embeds"], "mask.embeds_shape"), one], "mask.new", "mask.new")
        total = g.node("Gather", [g.op("Shape", ["attention_mask"], "mask.mask_shape"), one], "mask.total", "mask.total")
        past = g.op("Sub", [total, new], "mask.past")
        query_pos = g.op("Unsqueeze", [g.op("Range", [past, total, one], "mask.query_range"), g.ints("axes.last", [1])], "mask.query_pos")
        key_pos = g.op("Range", [first, total, one], "mask.key_pos")
        causal = g.op("LessOrEqual", [key_pos, query_pos], "mask.causal")
        real = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "mask.real_keys", to=TensorProto.BOOL),
                                  g.ints("axes.heads_queries", [1, 2])], "mask.real")
        allowed = g.op("And", [causal, real], "mask.allowed")
        return g.op("Where", [allowed, zero, masked], "mask.bias")

    def attention(self, i: int, attn, normed: str) -> str:
        """q|k|v in one MatMul, rotary on q and k, MultiHeadAttention over the past, the output projection."""
        g, p, heads, head_dim = self.g, f"layers.{i}", self.heads, self.head_dim
        qkv_weight = np.concatenate([to_numpy(attn.q_proj.weight).T, to_numpy(attn.k_proj.weight).T, to_numpy(attn.v_proj.weight).T], axis=1)
        qkv = g.node("MatMul", [normed, g.weight(f"{p}.qkv_proj.weight", qkv_weight)], f"{p}.qkv", f"{p}.qkv_proj")
        q, k, v = g.node("Split", [qkv, self.split_qkv], [f"{p}.q", f"{p}.k", f"{p}.v"], f"{p}.split_qkv", axis=-1)
        q = g.node("RotaryEmbedding", [q, "position_ids", self.cos, self.sin], f"{p}.q_rot", f"{p}.rotary_q", domain="com.microsoft", num_heads=heads)
        k = g.node("RotaryEmbedding", [k, "position_ids", self.cos, self.sin], f"{p}.k_rot", f"{p}.rotary_k", domain="com.microsoft", num_heads=heads)
        past_key, past_value = f"{PAST}{i}.key", f"{PAST}{i}.value"
        present_key, present_value = f"{PRESENT}{i}.key", f"{PRESENT}{i}.value"
        for name in (past_key, past_value):
            self.inputs.append(helper.make_tensor_value_info(name, g.elem, ["batch_size", heads, "past_sequence_length", head_dim]))
        for name in (present_key, present_value):
            self.outputs.append(helper.make_tensor_value_info(name, g.elem, ["batch_size", heads, "total_sequence_length", head_dim]))
        context = g.node("MultiHeadAttention", [q, k, v, "", "", self.bias, past_key, past_value],
                         [f"{p}.context", present_key, present_value], f"{p}.attention", domain="com.microsoft", num_heads=heads)[0]
        return g.node("MatMul", [context, g.weight(f"{p}.o_proj.weight", to_numpy(attn.o_proj.weight).T)], f"{p}.attn_out", f"{p}.o_proj")

    def mlp(self, p: str, mlp, normed: str) -> str:
        """gate|up in one MatMul, SiLU(gate) * up, the down projection."""
        g = self.g
        gate_up_weight = np.concatenate([to_numpy(mlp.gate_proj.weight).T, to_numpy(mlp.up_proj.weight).T], axis=1)
        gate_up = g.node("MatMul", [normed, g.weight(f"{p}.gate_up_proj.weight", gate_up_weight)], f"{p}.gate_up", f"{p}.gate_up_proj")
        gate, up = g.node("Split", [gate_up, self.split_mlp], [f"{p}.gate", f"{p}.up"], f"{p}.split_mlp", axis=-1)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.gate_sigmoid")], f"{p}.gate_silu")
        act = g.op("Mul", [silu, up], f"{p}.act")
        return g.node("MatMul", [act, g.weight(f"{p}.down_proj.weight", to_numpy(mlp.down_proj.weight).T)], f"{p}.mlp_out", f"{p}.down_proj")

    def head(self, mlp_out: str, residual: str) -> None:
        """Only the last position goes through the final norm and the LM head (left padding puts every row's newest
        token there); logits leave the graph in float32."""
        g = self.g
        starts, ends = g.ints("slice.last_start", [-1]), g.ints("slice.last_end", [TO_THE_END])
        axis = g.ints("slice.axis", [1])
        last_mlp = g.op("Slice", [mlp_out, starts, ends, axis], "last.mlp_out")
        last_residual = g.op("Slice", [residual, starts, ends, axis], "last.residual")
        final = g.node("SkipSimplifiedLayerNormalization", [last_mlp, last_residual, g.weight("norm.weight", to_numpy(self.text_model.norm.weight))],
                       ["last.normed", "", "", ""], "final_norm", domain="com.microsoft", epsilon=self.eps)
        logits = g.node("MatMul", [final, g.weight("lm_head.weight", to_numpy(self.model.lm_head.weight).T)],
                        "logits" if g.dtype == np.float32 else "logits.half", "lm_head")
        if g.dtype != np.float32:
            g.node("Cast", [logits], "logits", "logits.float", to=TensorProto.FLOAT)
        self.outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, self.config.vocab_size]))
