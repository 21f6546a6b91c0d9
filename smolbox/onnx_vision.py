"""SmolVLM's vision encoder (SigLIP tower + connector) as a compact ONNX graph written from the weights ("fused" vision).

torch.onnx traces each SigLIP layer into dozens of small nodes (LayerNorm pieces, per-head reshapes and
transposes, the attention maths, mask broadcasting, gelu as tanh arithmetic). On a GPU with onnxruntime's CUDA
provider the 13 tiles of one 512x384 image then take 108 ms in fp16 on an H100, where the matrix work needs ~15 ms.
This module writes the same function with onnxruntime's fused operators, 9 nodes per layer (32 ms there):

    SkipLayerNormalization (residual add + LayerNorm)  ->  MatMul q|k|v  ->  Split  ->
    MultiHeadAttention (q|k|v biases, additive mask)  ->  MatMul out_proj  ->
    SkipLayerNormalization (+ out_proj bias)  ->  MatMul fc1  ->  FastGelu (+ fc1 bias)  ->  MatMul fc2

(fc2's bias joins the next layer's SkipLayerNormalization). Interface and function are those of the traced
`smolbox.export.VisionEncoder`: pixel_values [batch, images, 3, H, W] and pixel_attention_mask [batch, images, H, W]
in, the features of the real (not all-zero) images out, [real images, tokens per image, text hidden]. In between:
patch mask, patch embedding, Idefics3's bucketized position ids, the encoder layers, post_layernorm, and the
connector's pixel shuffle + projection. The additive attention mask (keys of patches outside the image) is built
once and shared by every layer.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .onnx_decoder import _FLOAT, MASKED, OPSET, _Graph, _t

# hidden_act -> onnxruntime operator computing gelu(x + bias): FastGelu is the tanh approximation.
_GELU = {"gelu_pytorch_tanh": "FastGelu", "gelu_new": "FastGelu", "gelu": "BiasGelu"}
_VISION_TYPES = ("idefics3_vision", "smolvlm_vision")


def unsupported_reason(model) -> str | None:
    """Why this model's vision encoder cannot be written by this module (None when it can)."""
    config, vision = model.config, model.config.vision_config
    if vision.model_type not in _VISION_TYPES:
        return f"vision model type {vision.model_type!r} is not one of {', '.join(_VISION_TYPES)}"
    if vision.hidden_act not in _GELU:
        return f"vision activation {vision.hidden_act!r} (supported: {', '.join(_GELU)})"
    if vision.hidden_size % vision.num_attention_heads:
        return "vision hidden size is not a multiple of the number of heads"
    scale = getattr(config, "scale_factor", None)
    proj = getattr(getattr(getattr(model.model, "connector", None), "modality_projection", None), "proj", None)
    if not isinstance(scale, int) or scale < 1 or not isinstance(proj, torch.nn.Linear) or proj.bias is not None \
            or proj.in_features != vision.hidden_size * scale**2:
        return "the connector is not a pixel shuffle followed by one Linear without bias"
    return None


def build_vision_encoder(model, dtype=np.float32) -> onnx.ModelProto:
    """The vision_encoder graph of `model` (an Idefics3ForConditionalGeneration) in fp32 or fp16."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"the fused vision encoder does not support this model: {reason}")
    vision, config = model.model.vision_model, model.config.vision_config
    hidden, heads, patch = config.hidden_size, config.num_attention_heads, config.patch_size
    side, eps, scale = config.image_size // patch, float(config.layer_norm_eps), model.config.scale_factor
    g = _Graph(dtype)
    elem = _FLOAT[dtype]

    def op(op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        """One node with one output, both called `name`."""
        return g.node(op_type, inputs, name, name, domain=domain, **attrs)

    def ints(name: str, values) -> str:
        return g.weight(name, np.array(values, np.int64), np.int64)

    def skip_norm(name: str, norm, x: str, residual: str, bias: tuple[str, np.ndarray], residual_out: str = ""):
        """LayerNorm `norm` of x + residual + bias; with `residual_out` also that sum (the new residual stream)."""
        inputs = [x, residual, g.weight(f"{name}.weight", _t(norm.weight)), g.weight(f"{name}.bias", _t(norm.bias)), g.weight(*bias)]
        return g.node("SkipLayerNormalization", inputs, [f"{name}.out", "", "", residual_out], name, domain="com.microsoft", epsilon=eps)

    # Images of all rows in one batch, then only the real ones: the processor pads rows with fewer tiles with
    # all-zero images, which have no <image> tokens.
    pixel_dims = op("Shape", ["pixel_values"], "images.pixel_dims", start=2)  # [3, H, W]
    pixels = op("Reshape", ["pixel_values", op("Concat", [ints("images.flat", [-1]), pixel_dims], "images.pixels_shape", axis=0)],
                "images.all_pixels")
    mask_dims = op("Shape", ["pixel_attention_mask"], "images.mask_dims", start=2)  # [H, W]
    mask = op("Reshape", ["pixel_attention_mask", op("Concat", [ints("images.flat_channel", [-1, 1]), mask_dims], "images.mask_shape", axis=0)],
              "images.all_masks")  # [images, 1, H, W]
    largest = op("ReduceMax", [op("Abs", [pixels], "images.abs"), ints("axes.image", [1, 2, 3])], "images.largest", keepdims=0)
    real = op("Greater", [largest, g.weight("images.zero", np.array(0.0))], "images.real")  # any pixel not 0
    pixels = op("Compress", [pixels, real], "images.pixels", axis=0)
    mask = op("Compress", [mask, real], "images.masks", axis=0)

    # Patch embedding; its bias joins the first SkipLayerNormalization. A remainder narrower than a patch
    # (384 px = 27 x 14 + 6 in SmolVLM) belongs to no patch: the stride drops it here and in the mask's MaxPool.
    embed = vision.embeddings
    conv = op("Conv", [pixels, g.weight("embeddings.patch_embedding.weight", _t(embed.patch_embedding.weight))],
              "embeddings.patches", kernel_shape=[patch, patch], strides=[patch, patch])
    patches = op("Transpose", [op("Reshape", [conv, ints("shape.flatten_grid", [0, 0, -1])], "embeddings.patches_flat")],
                 "embeddings.patch_embeds", perm=[0, 2, 1])  # [images, patches, hidden]
    # A patch is real when any of its pixels is (transformers: unfold + sum > 0).
    patch_mask = op("MaxPool", [op("Cast", [mask], "patch_mask.pixels", to=TensorProto.FLOAT)], "patch_mask.float",
                    kernel_shape=[patch, patch], strides=[patch, patch])  # [images, 1, rows, cols]
    patch_real = op("Cast", [patch_mask], "patch_mask", to=TensorProto.BOOL)

    # Position ids (Idefics3VisionEmbeddings): per axis, coordinate i of an image n real patches long sits at
    # fraction i / n, bucketized (right=True) into `side` buckets; the boundaries are torch's own arange values, so
    # the float32 comparisons agree with transformers. pos = bucket_h * side + bucket_w, 0 for patches not real.
    boundaries = g.weight("position.boundaries", torch.arange(1 / side, 1.0, 1 / side).numpy(), np.float32)
    ceiling = g.weight("position.ceiling", np.array(1.0 - 1e-6), np.float32)
    buckets = {}
    for axis_name, axis, other, index_shape in (("h", 2, 3, [-1, 1]), ("w", 3, 2, [-1])):
        p = f"position.{axis_name}"
        # real patches along this axis, counted in the first row / column: [images, 1, 1, 1]
        edge = op("Slice", [patch_mask, ints(f"{p}.edge_start", [0]), ints(f"{p}.edge_end", [1]), ints(f"{p}.edge_axis", [other])],
                  f"{p}.edge")
        count = op("ReduceSum", [edge, ints(f"{p}.count_axis", [axis])], f"{p}.count")
        length = op("Squeeze", [op("Shape", [patch_mask], f"{p}.length_1d", start=axis, end=axis + 1)], f"{p}.length")
        index = op("Cast", [op("Range", [ints(f"{p}.range_start", 0), length, ints(f"{p}.range_step", 1)], f"{p}.index_int")],
                   f"{p}.index_float", to=TensorProto.FLOAT)
        index = op("Reshape", [index, ints(f"{p}.index_shape", index_shape)], f"{p}.index")
        # index * (1 / count), rounded twice as in torch: onnxruntime's optimizer rewrites Mul(x, Div(1, y)) into
        # Div(x, y), which rounds once and puts patch 10 of 27 into bucket 9; Reciprocal is left alone.
        step = op("Reciprocal", [count], f"{p}.step")
        fraction = op("Min", [op("Mul", [index, step], f"{p}.fraction_raw"), ceiling], f"{p}.fraction")
        column = op("Unsqueeze", [fraction, ints(f"{p}.boundary_axis", [-1])], f"{p}.fraction_col")
        passed = op("Cast", [op("GreaterOrEqual", [column, boundaries], f"{p}.passed")], f"{p}.passed_int", to=TensorProto.INT64)
        buckets[axis_name] = op("ReduceSum", [passed, ints(f"{p}.bucket_axis", [-1])], f"{p}.bucket", keepdims=0)
    grid = op("Add", [op("Mul", [buckets["h"], ints("position.side", side)], "position.row_start"), buckets["w"]], "position.grid")
    position_ids = op("Reshape", [op("Where", [patch_real, grid, ints("position.masked", 0)], "position.ids_grid"),
                                  ints("shape.per_image", [0, -1])], "position_ids")
    positions = op("Gather", [g.weight("embeddings.position_embedding.weight", _t(embed.position_embedding.weight)), position_ids],
                   "embeddings.position_embeds", axis=0)

    # Additive attention bias [images, 1, patches, patches]: 0 for keys whose patch is real, MASKED otherwise.
    # MultiHeadAttention broadcasts it over heads but needs the query dimension spelled out.
    key_real = op("Reshape", [patch_real, ints("shape.keys", [0, 1, 1, -1])], "mask.real_keys")
    key_bias = op("Where", [key_real, g.weight("mask.zero", np.array(0.0)), g.weight("mask.masked", np.array(MASKED))], "mask.key_bias")
    queries = op("Shape", [patches], "mask.queries", start=1, end=2)
    bias_shape = op("Concat", [ints("mask.shape_head", [1, 1]), queries, ints("mask.shape_tail", [1])], "mask.shape", axis=0)
    bias = op("Expand", [key_bias, bias_shape], "mask.bias")

    split_qkv = ints("split.qkv", [hidden, hidden, hidden])
    gelu = _GELU[config.hidden_act]
    # (name, values) of the bias that the next SkipLayerNormalization adds to the residual stream
    residual, residual_bias = patches, ("embeddings.patch_embedding.bias", _t(embed.patch_embedding.bias))
    mlp_out = positions  # the position embeddings join the residual stream in layer 0's first norm
    for i, layer in enumerate(vision.encoder.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        normed, residual = skip_norm(f"{p}.layer_norm1", layer.layer_norm1, mlp_out, residual, residual_bias, f"{p}.residual_in")
        qkv_weight = np.concatenate([_t(attn.q_proj.weight).T, _t(attn.k_proj.weight).T, _t(attn.v_proj.weight).T], axis=1)
        qkv_bias = np.concatenate([_t(attn.q_proj.bias), _t(attn.k_proj.bias), _t(attn.v_proj.bias)])
        qkv = g.node("MatMul", [normed, g.weight(f"{p}.qkv_proj.weight", qkv_weight)], f"{p}.qkv", f"{p}.qkv_proj")
        q, k, v = g.node("Split", [qkv, split_qkv], [f"{p}.q", f"{p}.k", f"{p}.v"], f"{p}.split_qkv", axis=-1)
        context = g.node("MultiHeadAttention", [q, k, v, g.weight(f"{p}.qkv_proj.bias", qkv_bias), "", bias], f"{p}.context",
                         f"{p}.attention", domain="com.microsoft", num_heads=heads, scale=float(attn.scale))
        attn_out = g.node("MatMul", [context, g.weight(f"{p}.out_proj.weight", _t(attn.out_proj.weight).T)], f"{p}.attn_out", f"{p}.out_proj")
        normed, residual = skip_norm(f"{p}.layer_norm2", layer.layer_norm2, attn_out, residual,
                                     (f"{p}.out_proj.bias", _t(attn.out_proj.bias)), f"{p}.residual_mid")
        fc1 = g.node("MatMul", [normed, g.weight(f"{p}.fc1.weight", _t(mlp.fc1.weight).T)], f"{p}.fc1_out", f"{p}.fc1")
        act = g.node(gelu, [fc1, g.weight(f"{p}.fc1.bias", _t(mlp.fc1.bias))], f"{p}.act", f"{p}.gelu", domain="com.microsoft")
        mlp_out = g.node("MatMul", [act, g.weight(f"{p}.fc2.weight", _t(mlp.fc2.weight).T)], f"{p}.mlp_out", f"{p}.fc2")
        residual_bias = (f"{p}.fc2.bias", _t(mlp.fc2.bias))

    features = skip_norm("post_layernorm", vision.post_layernorm, mlp_out, residual, residual_bias)

    # Connector pixel shuffle: token (r, c) of the (rows/s) x (cols/s) grid concatenates the s x s block of patch
    # features at rows r*s.., cols c*s.., row-major within the block; then the projection (Linear, no bias).
    cols = op("Shape", [patch_mask], "connector.cols", start=3, end=4)
    block_cols = op("Div", [cols, ints("connector.scale", [scale])], "connector.block_cols")
    block_shape = op("Concat", [ints("connector.shape_head", [0, -1, scale]), block_cols, ints("connector.shape_tail", [scale, hidden])],
                     "connector.block_shape", axis=0)
    blocks = op("Reshape", [features, block_shape], "connector.blocks")  # [images, rows/s, s, cols/s, s, hidden]
    blocks = op("Transpose", [blocks], "connector.blocks_grouped", perm=[0, 1, 3, 2, 4, 5])
    shuffled = op("Reshape", [blocks, ints("connector.token_shape", [0, -1, scale * scale * hidden])], "connector.shuffled")
    projection = model.model.connector.modality_projection.proj
    g.node("MatMul", [shuffled, g.weight("connector.modality_projection.weight", _t(projection.weight).T)], "image_features",
           "connector.modality_projection")

    text_hidden = model.config.text_config.hidden_size
    images = ["batch_size", "num_images"]
    inputs = [helper.make_tensor_value_info("pixel_values", elem, [*images, config.num_channels, "height", "width"]),
              helper.make_tensor_value_info("pixel_attention_mask", TensorProto.BOOL, [*images, "height", "width"])]
    outputs = [helper.make_tensor_value_info("image_features", elem, ["num_real_images", "image_tokens", text_hidden])]
    graph = helper.make_graph(g.nodes, "vision_encoder", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                             producer_name="smolbox.onnx_vision")
