"""The written embed_tokens graph against the model's nn.Embedding (fp32 and fp16) and against the graph torch.onnx
traces from it, and the tables it must leave to the tracer."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForImageTextToText

from smolbox.export.embed_tokens import build_embed_tokens, unsupported_reason
from smolbox.export.onnx_files import save_onnx
from smolbox.export.traced import traced_embeddings


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return AutoModelForImageTextToText.from_pretrained(tiny_bundle / "model", dtype=torch.float32).eval()


def _embeds(proto, path, input_ids: torch.Tensor) -> np.ndarray:
    save_onnx(proto, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["inputs_embeds"], {"input_ids": input_ids.numpy()})[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_equal_the_models_table(model, tmp_path, dtype):
    table = model.model.text_model.embed_tokens
    ids = torch.tensor([[0, 5, 7, table.num_embeddings - 1], [3, 3, 1, 2]])
    got = _embeds(build_embed_tokens(model, dtype), tmp_path / "embed_tokens.onnx", ids)
    assert got.dtype == dtype and got.shape == (2, 4, table.embedding_dim)
    with torch.no_grad():  # a gather: the rows cast equal the cast table's rows (and the shared model stays fp32)
        expected = table(ids).numpy().astype(dtype)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow  # a torch.onnx trace
def test_the_same_graph_as_torch_onnx_traces(model, tmp_path):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    written, traced = build_embed_tokens(model), traced_embeddings(model, ids)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in traced.graph.node] == ["Gather"]
    more = torch.tensor([[9, 8, 7, 6, 5]])
    np.testing.assert_array_equal(_embeds(written, tmp_path / "written.onnx", more), _embeds(traced, tmp_path / "traced.onnx", more))


def test_wrapped_tables_are_left_to_the_tracer(model):
    wrapped = copy.deepcopy(model)
    wrapped.model.text_model.embed_tokens = torch.nn.Sequential(wrapped.model.text_model.embed_tokens)
    assert "Sequential" in unsupported_reason(wrapped)
    assert unsupported_reason(model) is None
    with pytest.raises(ValueError, match="Sequential"):
        build_embed_tokens(wrapped)
