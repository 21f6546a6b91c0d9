"""The fused vision encoder graph against the PyTorch wrapper that the traced graph comes from (VisionEncoder):
processor outputs, padding images, masked patches, SmolVLM's real tile geometry, fp32 and fp16, and the models it
must refuse."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics3ForConditionalGeneration
from transformers.activations import ACT2FN

from smolbox.export.fused_vision import build_vision_encoder, unsupported_reason
from smolbox.export.onnx_files import save_onnx
from smolbox.export.parity import parity_inputs
from smolbox.export.traced import VisionEncoder
from tests.prompts import left_padded_batch

TOLERANCE = {np.float32: 1e-4, np.float16: 1e-2}  # relative to the largest feature


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return AutoModelForImageTextToText.from_pretrained(tiny_bundle / "model", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_bundle):
    return AutoProcessor.from_pretrained(tiny_bundle / "model")


@pytest.fixture(scope="module")
def real_geometry(model):
    """The tiny model with SmolVLM's tile geometry: 384-px tiles of 14-px patches (27 per side and a 6-px remainder
    that belongs to no patch), pixel shuffle 3 -> 81 tokens per tile. Random weights."""
    config = copy.deepcopy(model.config)
    config.vision_config.image_size, config.vision_config.patch_size, config.scale_factor = 384, 14, 3
    torch.manual_seed(3)
    return Idefics3ForConditionalGeneration(config).eval()


def _assert_matches(model, pixel_values, mask, dtype, tmp_path):
    path = tmp_path / f"vision_{np.dtype(dtype).name}.onnx"
    save_onnx(build_vision_encoder(model, dtype), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = VisionEncoder(model)(pixel_values, mask.bool()).numpy()
    (features,) = session.run(None, {"pixel_values": pixel_values.numpy().astype(dtype), "pixel_attention_mask": mask.bool().numpy()})
    assert features.dtype == dtype and features.shape == expected.shape
    error = np.abs(features.astype(np.float32) - expected).max()
    assert error <= TOLERANCE[dtype] * max(1.0, np.abs(expected).max()), error


def _partially_masked(images: int, size: int, patch: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images; image i keeps fewer rows than columns, some ending mid-patch, the rest of the mask false."""
    pixels = torch.randn(1, images, 3, size, size, generator=generator)
    mask = torch.zeros(1, images, size, size, dtype=torch.bool)
    for i in range(images):
        rows, cols = size - i * patch - patch // 2, size - i * (patch // 2)
        mask[0, i, :max(rows, 1), :max(cols, 1)] = True
        pixels[0, i, :, max(rows, 1):] = 0  # as the processor pads: zeros outside the image
        pixels[0, i, :, :, max(cols, 1):] = 0
    return pixels, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_processor_outputs_match_pytorch(model, processor, dtype, tmp_path):
    inputs = parity_inputs(processor, 1)[0]
    assert inputs["pixel_values"].shape[1] > 1, "image splitting: several tiles"
    _assert_matches(model, inputs["pixel_values"], inputs["pixel_attention_mask"], dtype, tmp_path)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_padding_images_match_pytorch(model, processor, dtype, tmp_path):
    # (The processor resizes every tile to a full square, so its real images have no masked patches; the
    # hand-made masks below cover those.)
    inputs = left_padded_batch(copy.deepcopy(processor))
    assert (inputs["pixel_values"] == 0).flatten(2).all(-1).any(), "the batch must carry a padding image"
    _assert_matches(model, inputs["pixel_values"], inputs["pixel_attention_mask"], dtype, tmp_path)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hand_made_partial_masks_match_pytorch(model, dtype, tmp_path):
    patch, size = model.config.vision_config.patch_size, model.config.vision_config.image_size
    pixels, mask = _partially_masked(3, size, patch, torch.Generator().manual_seed(5))
    pixels = torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)  # and a padding image at the end
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    _assert_matches(model, pixels, mask, dtype, tmp_path)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_real_tile_geometry_matches_pytorch(real_geometry, dtype, tmp_path):
    # Every count of real patches per axis, 1..27: the position buckets depend on float32 rounding of i * (1 / n).
    generator = torch.Generator().manual_seed(11)
    pixels, mask = _partially_masked(27, 384, 14, generator)
    full = torch.randn(1, 2, 3, 384, 384, generator=generator)
    pixels, mask = torch.cat([full, pixels], dim=1), torch.cat([torch.ones(1, 2, 384, 384, dtype=torch.bool), mask], dim=1)
    _assert_matches(real_geometry, pixels, mask, dtype, tmp_path)


def test_exact_gelu_matches_pytorch(model, processor, tmp_path):
    exact = copy.deepcopy(model)
    exact.config.vision_config.hidden_act = "gelu"
    for layer in exact.model.vision_model.encoder.layers:
        layer.mlp.activation_fn = ACT2FN["gelu"]
    assert any(n.op_type == "BiasGelu" for n in build_vision_encoder(exact).graph.node)
    inputs = parity_inputs(processor, 1)[0]
    _assert_matches(exact, inputs["pixel_values"], inputs["pixel_attention_mask"], np.float32, tmp_path)


def test_graph_is_compact(model):
    proto = build_vision_encoder(model)
    layers = model.config.vision_config.num_hidden_layers
    per_layer = [n for n in proto.graph.node if n.name.startswith("layers.")]
    assert len(per_layer) == 10 * layers  # torch.onnx traces ~45
    assert "Split" not in {n.op_type for n in per_layer}  # q, k and v are products of their own
    assert {"MultiHeadAttention", "SkipLayerNormalization", "FastGelu"} <= {n.op_type for n in per_layer}
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"pixel_values": ["batch_size", "num_images", 3, "height", "width"],
                    "pixel_attention_mask": ["batch_size", "num_images", "height", "width"]}


def test_unsupported_models_are_named(model):
    relu = copy.deepcopy(model)
    relu.config.vision_config.hidden_act = "quick_gelu"
    assert "quick_gelu" in unsupported_reason(relu)
    with pytest.raises(ValueError, match="quick_gelu"):
        build_vision_encoder(relu)
    biased = copy.deepcopy(model)
    proj = biased.model.connector.modality_projection.proj
    proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features))
    assert "connector" in unsupported_reason(biased)
    assert unsupported_reason(model) is None
