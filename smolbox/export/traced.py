"""The graphs torch.onnx traces from the merged model (export.decoder / export.vision = traced, and token tables
that smolbox.export.embed_tokens cannot write): wrappers with the published SmolVLM interface, and the one
tracing call they share."""

from __future__ import annotations

import contextlib
from pathlib import Path

import onnx
import torch
from torch.export import Dim
from transformers import DynamicCache

from .onnx_files import quiet_exporter, save_onnx


class VisionEncoder(torch.nn.Module):
    """pixel_values [B, N, 3, H, W] + pixel_attention_mask bool [B, N, H, W] -> features of the real images.

    All-zero images are the processor's padding (rows with fewer tiles); they are dropped here, so the output
    flattens to exactly one row per <image> token.
    """

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector
        self.patch = model.config.vision_config.patch_size

    def forward(self, pixel_values, pixel_attention_mask):
        b, n, c, h, w = pixel_values.shape
        pixels = pixel_values.reshape(b * n, c, h, w)
        mask = pixel_attention_mask.reshape(b * n, h, w)
        real = (pixels != 0).flatten(1).any(1)
        pixels, mask = pixels[real], mask[real]
        if isinstance(pixels.shape[0], torch.SymInt):
            # Tracing only: the number of real images is data-dependent, and some torch versions (2.11) then
            # cannot decide how attention masks broadcast ("Could not guard on data-dependent expression
            # Eq(u0, 1)"). Both operands share that size, so either branch computes the same thing.
            torch._check(pixels.shape[0] != 1)
        p = self.patch
        # Patches tile the image from the top-left; a remainder narrower than a patch (384 px = 27 x 14 + 6 in
        # SmolVLM) belongs to no patch, as in transformers' unfold and the patch convolution's stride.
        rows, cols = h // p, w // p
        patch_mask = mask[:, : rows * p, : cols * p].reshape(mask.shape[0], rows, p, cols, p).any(4).any(2)
        features = self.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
        return self.connector(features)


class TokenEmbeddings(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.text_model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderWithCache(torch.nn.Module):
    """inputs_embeds + attention_mask + position_ids + past (key, value per layer) -> logits + present."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model.model.text_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.text_config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.text_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(out.last_hidden_state), *present)


def traced_vision(model, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> onnx.ModelProto:
    """The vision encoder traced by torch.onnx, with dynamic batch, image count and size."""
    return trace(VisionEncoder(model), (pixel_values, pixel_mask), ["pixel_values", "pixel_attention_mask"], ["image_features"],
                 {"pixel_values": {0: "batch_size", 1: "num_images", 3: "height", 4: "width"},
                  "pixel_attention_mask": {0: "batch_size", 1: "num_images", 2: "height", 3: "width"}})


def export_traced_vision(model, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, path: Path) -> None:
    save_onnx(traced_vision(model, pixel_values, pixel_mask), path)


def traced_embeddings(model, input_ids: torch.Tensor) -> onnx.ModelProto:
    return trace(TokenEmbeddings(model), (input_ids,), ["input_ids"], ["inputs_embeds"],
                 {"input_ids": {0: "batch_size", 1: "sequence_length"}})


def traced_decoder(model, dtype: torch.dtype) -> onnx.ModelProto:
    """The decoder with its KV cache, traced with a non-empty past (torch.export specializes sizes 0 and 1); the
    graph also runs with past length 0."""
    text = model.config.text_config
    layers, hidden = text.num_hidden_layers, text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    batch, new, past_len = 2, 3, 2
    embeds = torch.randn(batch, new, hidden, dtype=dtype)
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new).expand(batch, new)
    past = tuple(torch.randn(batch, text.num_key_value_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers))
    names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    seq = Dim("sequence_length")
    bsz = Dim("batch_size")
    return trace(DecoderWithCache(model), (embeds, mask, positions, past),
                 ["inputs_embeds", "attention_mask", "position_ids", *[f"past_key_values.{n}" for n in names]],
                 ["logits", *[f"present.{n}" for n in names]],
                 {"inputs_embeds": {0: bsz, 1: seq}, "attention_mask": {0: bsz, 1: Dim("total_sequence_length")},
                  "position_ids": {0: bsz, 1: seq},
                  "past": tuple({0: bsz, 2: Dim("past_sequence_length", min=0)} for _ in names)},
                 rename_outputs={f"present.{n}": {2: "total_sequence_length"} for n in names})


def trace(module, args, input_names, output_names, dynamic_shapes, rename_outputs=None) -> onnx.ModelProto:
    with torch.no_grad(), quiet_exporter(), _exportable_bucketize():
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    proto = program.model_proto
    for output in proto.graph.output:
        for axis, name in (rename_outputs or {}).get(output.name, {}).items():
            output.type.tensor_type.shape.dim[axis].dim_param = name
    return proto


@contextlib.contextmanager
def _exportable_bucketize():
    """torch.bucketize as a comparison and a sum while tracing.

    Idefics3's vision embeddings bucketize patch coordinates; torch.onnx lowers bucketize to a GatherND that
    onnxruntime rejects once a coordinate reaches the last bucket ("invalid index found, index = 26" with
    SmolVLM's 27 patches per side; the tiny model's 4 never do). Counting boundaries is the same function.
    """
    original = torch.bucketize

    def bucketize(input, boundaries, *, out_int32=False, right=False, **kwargs):
        if kwargs or not isinstance(input, torch.Tensor) or boundaries.dim() != 1:
            return original(input, boundaries, out_int32=out_int32, right=right, **kwargs)
        passed = input.unsqueeze(-1) >= boundaries if right else input.unsqueeze(-1) > boundaries
        return passed.sum(-1).to(torch.int32 if out_int32 else torch.int64)

    torch.bucketize = bucketize
    try:
        yield
    finally:
        torch.bucketize = original
