"""The three graphs of a variant: their signatures (fused and traced), and fp32 ONNX greedy decoding equal to PyTorch's
generate, token for token, for one prompt and a left-padded pair with a padding image."""

import numpy as np
import onnx
import pytest
import torch

from smolbox.export.parity import parity_inputs
from smolbox.onnx_layout import graph_path
from smolbox.runtime import OnnxVLM
from tests.prompts import left_padded_batch


def test_graph_signatures(tiny_export):
    def signature(path):
        model = onnx.load(str(path), load_external_data=False)
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        return ({i.name: (i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input},
                {o.name: dims(o) for o in model.graph.output}, model.ir_version)

    inputs, outputs, ir = signature(graph_path(tiny_export.folder, "vision_encoder", "fp32"))
    assert inputs["pixel_values"] == (onnx.TensorProto.FLOAT, ["batch_size", "num_images", 3, "height", "width"])
    assert inputs["pixel_attention_mask"] == (onnx.TensorProto.BOOL, ["batch_size", "num_images", "height", "width"])
    assert ir <= 10
    inputs, outputs, _ = signature(graph_path(tiny_export.folder, "decoder_model_merged", "fp32"))
    assert list(inputs)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == (onnx.TensorProto.INT64, ["batch_size", "total_sequence_length"])
    assert inputs["past_key_values.0.key"][1] == ["batch_size", 4, "past_sequence_length", 16]
    assert outputs["logits"][0:2] == ["batch_size", 1]  # the fused decoder returns the last position only
    assert outputs["present.1.value"] == ["batch_size", 4, "total_sequence_length", 16]
    assert tiny_export.manifest["decoder"] == "fused" and tiny_export.manifest["vision"] == "fused"


@pytest.mark.slow  # the torch.onnx trace (torch.export's symbolic shapes) takes tens of seconds on a CPU core
def test_traced_decoder_keeps_the_full_sequence_layout(tiny_export_traced):
    model = onnx.load(str(graph_path(tiny_export_traced.folder, "decoder_model_merged", "fp32")), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert [d.dim_param for d in logits.type.tensor_type.shape.dim][:2] == ["batch_size", "sequence_length"]
    assert tiny_export_traced.manifest["decoder"] == "traced" and tiny_export_traced.manifest["vision"] == "traced"


@pytest.mark.parametrize("decoder", ["fused", pytest.param("traced", marks=pytest.mark.slow)])
@pytest.mark.parametrize("batch", ["single", "left_padded_pair"])
def test_fp32_onnx_greedy_equals_pytorch_generate(request, merged, batch, decoder):
    tiny_export = request.getfixturevalue("tiny_export" if decoder == "fused" else "tiny_export_traced")
    model, processor = merged
    inputs = parity_inputs(processor, 1)[0] if batch == "single" else left_padded_batch(processor)
    if batch != "single":
        assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
        assert (inputs["pixel_values"] == 0).flatten(2).all(-1).any(), "the batch must carry a padding image"
    new = 12
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:].numpy()
    runtime = OnnxVLM(tiny_export.folder, "fp32", providers=["CPUExecutionProvider"])
    arrays = {k: v.numpy() for k, v in inputs.items()}
    ours = runtime.generate(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["pixel_attention_mask"], new)
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
