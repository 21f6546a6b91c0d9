"""The fused decoder graph against transformers' Llama decoder on the tiny model: prefill and cached decode,
left padding, fp32 and fp16, and the models it must refuse."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForImageTextToText

from smolbox.export.fused_decoder import build_decoder, unsupported_reason
from smolbox.export.onnx_files import save_onnx


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return AutoModelForImageTextToText.from_pretrained(tiny_bundle / "model", dtype=torch.float32).eval()


def _session(model, dtype, tmp_path):
    path = tmp_path / f"decoder_{np.dtype(dtype).name}.onnx"
    save_onnx(build_decoder(model, dtype), path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-5), (np.float16, 5e-3)])
def test_prefill_and_decode_match_transformers(model, tmp_path, dtype, tolerance):
    session = _session(model, dtype, tmp_path)
    config = model.config.text_config
    rng = torch.Generator().manual_seed(7)
    embeds = torch.randn(3, 9, config.hidden_size, generator=rng)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"inputs_embeds": embeds.numpy().astype(dtype), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((3, config.num_key_value_heads, 0, config.head_dim), dtype)
    names = [o.name for o in session.get_outputs()]
    with torch.no_grad():
        out = model.model.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        expected = model.lm_head(out.last_hidden_state)[:, -1:].numpy()
    logits, *present = session.run(None, feeds)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    assert np.abs(logits - expected).max() <= tolerance * max(1.0, np.abs(expected).max())
    reference_keys = out.past_key_values.layers[0].keys.numpy()
    assert np.abs(present[names.index("present.0.key") - 1] - reference_keys).max() <= tolerance * max(1.0, np.abs(reference_keys).max())

    # Two cached decode steps on top of the prefill.
    cache = out.past_key_values
    for step in range(2):
        new = torch.randn(3, 1, config.hidden_size, generator=rng)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        with torch.no_grad():
            out = model.model.text_model(inputs_embeds=new, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            expected = model.lm_head(out.last_hidden_state)[:, -1:].numpy()
        cache = out.past_key_values
        feeds = {"inputs_embeds": new.numpy().astype(dtype), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
                 **{n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], present)}}
        logits, *present = session.run(None, feeds)
        assert present[0].shape[2] == mask.shape[1]
        assert np.abs(logits - expected).max() <= tolerance * max(1.0, np.abs(expected).max()), step


def test_graph_is_compact(model):
    proto = build_decoder(model)
    layers = model.config.text_config.num_hidden_layers
    per_layer = [n for n in proto.graph.node if n.name.startswith("layers.")]
    assert len(per_layer) == 14 * layers  # torch.onnx traces ~75
    ops = {n.op_type for n in per_layer}
    assert {"MultiHeadAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops


def test_unsupported_models_are_named(model):
    gqa = copy.deepcopy(model)
    gqa.config.text_config.num_key_value_heads = 2
    assert "grouped-query" in unsupported_reason(gqa)
    other = copy.deepcopy(model)
    other.config.text_config.hidden_act = "gelu"
    assert "gelu" in unsupported_reason(other)
    assert unsupported_reason(model) is None
    with pytest.raises(ValueError, match="grouped-query"):
        build_decoder(gqa)
