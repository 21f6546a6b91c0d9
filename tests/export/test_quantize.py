"""The quantized variants: each loads and generates from a left-padded batch, and 4-bit weights are small."""

import json

import pytest

from smolbox.export.onnx_files import weight_bytes
from smolbox.onnx_layout import GRAPHS, graph_path
from smolbox.runtime import OnnxVLM
from tests.prompts import left_padded_batch

VARIANTS = ["fp32", "fp16", "q8", "q4", "q4f16", "int8"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_loads_and_generates(tiny_export, merged, variant):
    _, processor = merged
    inputs = {k: v.numpy() for k, v in left_padded_batch(processor).items()}
    runtime = OnnxVLM(tiny_export.folder, variant, providers=["CPUExecutionProvider"])
    tokens = runtime.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"], 6)
    vocab = json.loads((tiny_export.folder / "config.json").read_text())["text_config"]["vocab_size"]
    assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 6
    assert ((tokens >= 0) & (tokens < vocab)).all()
    assert variant in tiny_export.parity["variants"]


def test_int4_weights_are_under_a_third_of_fp32(tiny_export):
    variants = tiny_export.manifest["variants"]
    q4, fp32 = variants["q4"]["weight_bytes"], variants["fp32"]["weight_bytes"]
    assert q4 == sum(weight_bytes(graph_path(tiny_export.folder, g, "q4")) for g in GRAPHS)
    assert 0 < q4 < 0.35 * fp32, (q4, fp32)
