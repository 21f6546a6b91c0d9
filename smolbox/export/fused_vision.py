"""SmolVLM's vision encoder (SigLIP tower + connector) as a compact ONNX graph written from the weights ("fused" vision).

torch.onnx traces each SigLIP layer into dozens of small nodes (LayerNorm pieces, per-head reshapes and
transposes, the attention maths, mask broadcasting, gelu as tanh arithmetic); on a GPU each is a kernel launch.
This module writes the same function with onnxruntime's fused operators, 10 nodes per layer (the measured
difference: docs/benchmarks.md):

    SkipLayerNormalization (residual add + LayerNorm)  ->  MatMul q, MatMul k, MatMul v  ->
    MultiHeadAttention (q|k|v biases, additive mask)  ->  MatMul out_proj  ->
    SkipLayerNormalization (+ out_proj bias)  ->  MatMul fc1  ->  FastGelu (+ fc1 bias)  ->  MatMul fc2

(q, k and v are three products rather than one and a Split: the Split copied [tiles x patches, 3 x hidden] a
layer, a copy the three products do without, and a 13-tile image encodes faster on the H200: docs/benchmarks.md,
2026-12-01 lease 9, "The vision encoder alone".)

(fc2's bias joins the next layer's SkipLayerNormalization). Interface and function are those of the traced
`smolbox.export.traced.VisionEncoder`: pixel_values [batch, images, 3, H, W] and pixel_attention_mask [batch,
images, H, W] in, the features of the real (not all-zero) images out, [real images, tokens per image, text hidden].
One method per block, in the order the graph runs them: the real images, patch embedding and patch mask,
Idefics3's bucketized position ids, the attention bias (shared by every layer), the encoder layers, post_layernorm,
and the connector's pixel shuffle + projection.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .graph_writer import MASKED, GraphWriter, to_numpy

# hidden_act -> onnxruntime operator computing gelu(x + bias): FastGelu is the tanh approximation.
GELU = {"gelu_pytorch_tanh": "FastGelu", "gelu_new": "FastGelu", "gelu": "BiasGelu"}
VISION_TYPES = ("idefics3_vision", "smolvlm_vision")


def unsupported_reason(model) -> str | None:
    """Why this model's vision encoder cannot be written by this module (None when it can)."""
    config, vision = model.config, model.config.vision_config
    if vision.model_type not in VISION_TYPES:
        return f"vision model type {vision.model_type!r} is not one of {', '.join(VISION_TYPES)}"
    if vision.hidden_act not in GELU:
        return f"vision activation {vision.hidden_act!r} (supported: {', '.join(GELU)})"
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
    return _VisionEncoder(model, dtype).build()


class _VisionEncoder:
    def __init__(self, model, dtype):
        self.model, self.vision, self.config = model, model.model.vision_model, model.config.vision_config
        config = self.config
        self.hidden, self.heads, self.patch = config.hidden_size, config.num_attention_heads, config.patch_size
        self.side, self.eps, self.scale = config.image_size // self.patch, float(config.layer_norm_eps), model.config.scale_factor
        self.g = GraphWriter(dtype)

    def build(self) -> onnx.ModelProto:
        g = self.g
        pixels, mask = self.real_images()
        patches, patch_mask, patch_real = self.patches(pixels, mask)
        positions = self.position_embeddings(patch_mask, patch_real)
        self.bias = self.attention_bias(patches, patch_real)
        # (name, values) of the bias that the next SkipLayerNormalization adds to the residual stream
        embed = self.vision.embeddings
        residual, residual_bias = patches, ("embeddings.patch_embedding.bias", to_numpy(embed.patch_embedding.bias))
        mlp_out = positions  # the position embeddings join the residual stream in layer 0's first norm
        for i, layer in enumerate(self.vision.encoder.layers):
            p = f"layers.{i}"
            normed, residual = self.skip_norm(f"{p}.layer_norm1", layer.layer_norm1, mlp_out, residual, residual_bias, f"{p}.residual_in")
            attn_out = self.attention(p, layer.self_attn, normed)
            normed, residual = self.skip_norm(f"{p}.layer_norm2", layer.layer_norm2, attn_out, residual,
                                              (f"{p}.out_proj.bias", to_numpy(layer.self_attn.out_proj.bias)), f"{p}.residual_mid")
            mlp_out = self.mlp(p, layer.mlp, normed)
            residual_bias = (f"{p}.fc2.bias", to_numpy(layer.mlp.fc2.bias))
        features = self.skip_norm("post_layernorm", self.vision.post_layernorm, mlp_out, residual, residual_bias)
        self.connector(features, patch_mask)

        images = ["batch_size", "num_images"]
        inputs = [helper.make_tensor_value_info("pixel_values", g.elem, [*images, self.config.num_channels, "height", "width"]),
                  helper.make_tensor_value_info("pixel_attention_mask", TensorProto.BOOL, [*images, "height", "width"])]
        text_hidden = self.model.config.text_config.hidden_size
        outputs = [helper.make_tensor_value_info("image_features", g.elem, ["num_real_images", "image_tokens", text_hidden])]
        return g.model("vision_encoder", inputs, outputs, "smolbox.export.fused_vision")

    def skip_norm(self, name: str, norm, x: str, residual: str, bias: tuple[str, np.ndarray], residual_out: str = ""):
        """LayerNorm `norm` of x + residual + bias; with `residual_out` also that sum (the new residual stream)."""
        g = self.g
        inputs = [x, residual, g.weight(f"{name}.weight", to_numpy(norm.weight)), g.weight(f"{name}.bias", to_numpy(norm.bias)), g.weight(*bias)]
        return g.node("SkipLayerNormalization", inputs, [f"{name}.out", "", "", residual_out], name, domain="com.microsoft", epsilon=self.eps)

    def real_images(self) -> tuple[str, str]:
        """The images of all rows in one batch, then only the real ones: the processor pads rows with fewer tiles
        with all-zero images, which have no <image> tokens."""
        g = self.g
        pixel_dims = g.op("Shape", ["pixel_values"], "images.pixel_dims", start=2)  # [3, H, W]
        pixels = g.op("Reshape", ["pixel_values", g.op("Concat", [g.ints("images.flat", [-1]), pixel_dims], "images.pixels_shape", axis=0)],
                      "images.all_pixels")
        mask_dims = g.op("Shape", ["pixel_attention_mask"], "images.mask_dims", start=2)  # [H, W]
        mask = g.op("Reshape", ["pixel_attention_mask", g.op("Concat", [g.ints("images.flat_channel", [-1, 1]), mask_dims], "images.mask_shape", axis=0)],
                    "images.all_masks")  # [images, 1, H, W]
        largest = g.op("ReduceMax", [g.op("Abs", [pixels], "images.abs"), g.ints("axes.image", [1, 2, 3])], "images.largest", keepdims=0)
        real = g.op("Greater", [largest, g.weight("images.zero", np.array(0.0))], "images.real")  # any pixel not 0
        return g.op("Compress", [pixels, real], "images.pixels", axis=0), g.op("Compress", [mask, real], "images.masks", axis=0)

    def patches(self, pixels: str, mask: str) -> tuple[str, str, str]:
        """Patch embedding (its bias joins the first SkipLayerNormalization) and which patches are real. A remainder
        narrower than a patch (384 px = 27 x 14 + 6 in SmolVLM) belongs to no patch: the stride drops it here and
        in the mask's MaxPool."""
        g, patch, embed = self.g, self.patch, self.vision.embeddings
        conv = g.op("Conv", [pixels, g.weight("embeddings.patch_embedding.weight", to_numpy(embed.patch_embedding.weight))],
                    "embeddings.patches", kernel_shape=[patch, patch], strides=[patch, patch])
        patches = g.op("Transpose", [g.op("Reshape", [conv, g.ints("shape.flatten_grid", [0, 0, -1])], "embeddings.patches_flat")],
                       "embeddings.patch_embeds", perm=[0, 2, 1])  # [images, patches, hidden]
        # A patch is real when any of its pixels is (transformers: unfold + sum > 0).
        patch_mask = g.op("MaxPool", [g.op("Cast", [mask], "patch_mask.pixels", to=TensorProto.FLOAT)], "patch_mask.float",
                          kernel_shape=[patch, patch], strides=[patch, patch])  # [images, 1, rows, cols]
        return patches, patch_mask, g.op("Cast", [patch_mask], "patch_mask", to=TensorProto.BOOL)

    def position_embeddings(self, patch_mask: str, patch_real: str) -> str:
        """Position ids (Idefics3VisionEmbeddings): per axis, coordinate i of an image n real patches long sits at
        fraction i / n, bucketized (right=True) into `side` buckets; the boundaries are torch's own arange values, so
        the float32 comparisons agree with transformers. pos = bucket_h * side + bucket_w, 0 for patches not real."""
        g, side = self.g, self.side
        boundaries = g.weight("position.boundaries", torch.arange(1 / side, 1.0, 1 / side).numpy(), np.float32)
        ceiling = g.weight("position.ceiling", np.array(1.0 - 1e-6), np.float32)
        buckets = {}
        for axis_name, axis, other, index_shape in (("h", 2, 3, [-1, 1]), ("w", 3, 2, [-1])):
            p = f"position.{axis_name}"
            # real patches along this axis, counted in the first row / column: [images, 1, 1, 1]
            edge = g.op("Slice", [patch_mask, g.ints(f"{p}.edge_start", [0]), g.ints(f"{p}.edge_end", [1]), g.ints(f"{p}.edge_axis", [other])],
                        f"{p}.edge")
            count = g.op("ReduceSum", [edge, g.ints(f"{p}.count_axis", [axis])], f"{p}.count")
            length = g.op("Squeeze", [g.op("Shape", [patch_mask], f"{p}.length_1d", start=axis, end=axis + 1)], f"{p}.length")
            index = g.op("Cast", [g.op("Range", [g.ints(f"{p}.range_start", 0), length, g.ints(f"{p}.range_step", 1)], f"{p}.index_int")],
                         f"{p}.index_float", to=TensorProto.FLOAT)
            index = g.op("Reshape", [index, g.ints(f"{p}.index_shape", index_shape)], f"{p}.index")
            # index * (1 / count), rounded twice as in torch: onnxruntime's optimizer rewrites Mul(x, Div(1, y)) into
            # Div(x, y), which rounds once and puts patch 10 of 27 into bucket 9; Reciprocal is left alone.
            step = g.op("Reciprocal", [count], f"{p}.step")
            fraction = g.op("Min", [g.op("Mul", [index, step], f"{p}.fraction_raw"), ceiling], f"{p}.fraction")
            column = g.op("Unsqueeze", [fraction, g.ints(f"{p}.boundary_axis", [-1])], f"{p}.fraction_col")
            passed = g.op("Cast", [g.op("GreaterOrEqual", [column, boundaries], f"{p}.passed")], f"{p}.passed_int", to=TensorProto.INT64)
            buckets[axis_name] = g.op("ReduceSum", [passed, g.ints(f"{p}.bucket_axis", [-1])], f"{p}.bucket", keepdims=0)
        grid = g.op("Add", [g.op("Mul", [buckets["h"], g.ints("position.side", side)], "position.row_start"), buckets["w"]], "position.grid")
        position_ids = g.op("Reshape", [g.op("Where", [patch_real, grid, g.ints("position.masked", 0)], "position.ids_grid"),
                                        g.ints("shape.per_image", [0, -1])], "position_ids")
        embedding = self.vision.embeddings.position_embedding.weight
        return g.op("Gather", [g.weight("embeddings.position_embedding.weight", to_numpy(embedding)), position_ids],
                    "embeddings.position_embeds", axis=0)

    def attention_bias(self, patches: str, patch_real: str) -> str:
        """Additive attention bias [images, 1, patches, patches]: 0 for keys whose patch is real, MASKED otherwise.
        MultiHeadAttention broadcasts it over heads but needs the query dimension spelled out."""
        g = self.g
        key_real = g.op("Reshape", [patch_real, g.ints("shape.keys", [0, 1, 1, -1])], "mask.real_keys")
        key_bias = g.op("Where", [key_real, g.weight("mask.zero", np.array(0.0)), g.weight("mask.masked", np.array(MASKED))], "mask.key_bias")
        queries = g.op("Shape", [patches], "mask.queries", start=1, end=2)
        bias_shape = g.op("Concat", [g.ints("mask.shape_head", [1, 1]), queries, g.ints("mask.shape_tail", [1])], "mask.shape", axis=0)
        return g.op("Expand", [key_bias, bias_shape], "mask.bias")

    def attention(self, p: str, attn, normed: str) -> str:
        """q, k and v MatMuls, MultiHeadAttention with the q|k|v biases and the shared mask, the output projection."""
        g = self.g
        q, k, v = (g.node("MatMul", [normed, g.weight(f"{p}.{x}_proj.weight", to_numpy(getattr(attn, f"{x}_proj").weight).T)],
                          f"{p}.{x}", f"{p}.{x}_proj") for x in "qkv")
        qkv_bias = np.concatenate([to_numpy(attn.q_proj.bias), to_numpy(attn.k_proj.bias), to_numpy(attn.v_proj.bias)])
        context = g.node("MultiHeadAttention", [q, k, v, g.weight(f"{p}.qkv_proj.bias", qkv_bias), "", self.bias], f"{p}.context",
                         f"{p}.attention", domain="com.microsoft", num_heads=self.heads, scale=float(attn.scale))
        return g.node("MatMul", [context, g.weight(f"{p}.out_proj.weight", to_numpy(attn.out_proj.weight).T)], f"{p}.attn_out", f"{p}.out_proj")

    def mlp(self, p: str, mlp, normed: str) -> str:
        """fc1, gelu with fc1's bias in one operator, fc2 (its bias joins the next norm)."""
        g = self.g
        fc1 = g.node("MatMul", [normed, g.weight(f"{p}.fc1.weight", to_numpy(mlp.fc1.weight).T)], f"{p}.fc1_out", f"{p}.fc1")
        act = g.node(GELU[self.config.hidden_act], [fc1, g.weight(f"{p}.fc1.bias", to_numpy(mlp.fc1.bias))], f"{p}.act", f"{p}.gelu",
                     domain="com.microsoft")
        return g.node("MatMul", [act, g.weight(f"{p}.fc2.weight", to_numpy(mlp.fc2.weight).T)], f"{p}.mlp_out", f"{p}.fc2")

    def connector(self, features: str, patch_mask: str) -> None:
        """Pixel shuffle: token (r, c) of the (rows/s) x (cols/s) grid concatenates the s x s block of patch features
        at rows r*s.., cols c*s.., row-major within the block; then the projection (Linear, no bias)."""
        g, scale, hidden = self.g, self.scale, self.hidden
        cols = g.op("Shape", [patch_mask], "connector.cols", start=3, end=4)
        block_cols = g.op("Div", [cols, g.ints("connector.scale", [scale])], "connector.block_cols")
        block_shape = g.op("Concat", [g.ints("connector.shape_head", [0, -1, scale]), block_cols, g.ints("connector.shape_tail", [scale, hidden])],
                           "connector.block_shape", axis=0)
        blocks = g.op("Reshape", [features, block_shape], "connector.blocks")  # [images, rows/s, s, cols/s, s, hidden]
        blocks = g.op("Transpose", [blocks], "connector.blocks_grouped", perm=[0, 1, 3, 2, 4, 5])
        shuffled = g.op("Reshape", [blocks, g.ints("connector.token_shape", [0, -1, scale * scale * hidden])], "connector.shuffled")
        projection = self.model.model.connector.modality_projection.proj
        g.node("MatMul", [shuffled, g.weight("connector.modality_projection.weight", to_numpy(projection.weight).T)], "image_features",
               "connector.modality_projection")
