"""The decoder form the server derives from the export's fused decoder graph (smolbox.serve.derive); its runtime's
tokens against the published decoder and PyTorch are in test_kv_decoder.py."""

import hashlib

import onnx
import pytest

from smolbox.onnx_layout import graph_path
from smolbox.serve.derive import NEXT_TOKEN, NotDerivable, derive


def test_the_derived_graph_is_the_slot_form_and_the_published_file_stays(random_export):
    path = graph_path(random_export, "decoder_model_merged", "fp32")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    derived = derive(onnx.load(str(path), load_external_data=False))
    ops = [n.op_type for n in derived.model.graph.node]
    assert ops.count("GroupQueryAttention") == derived.layers == 2
    assert not {"MultiHeadAttention", "RotaryEmbedding", "Range", "Where"} & set(ops)  # attention, rotary, the mask
    assert ops.count("Split") == 2  # the MLPs' gate|up only
    inputs = {i.name for i in derived.model.graph.input}
    assert {"seqlens_k", "total_sequence_length", "inputs_embeds"} <= inputs and not {"attention_mask", "position_ids"} & inputs
    assert ops.count("ArgMax") == 1 and NEXT_TOKEN in {o.name for o in derived.model.graph.output}  # the greedy token
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with pytest.raises(NotDerivable, match="no MultiHeadAttention"):  # e.g. a traced decoder
        derive(onnx.load(str(graph_path(random_export, "embed_tokens", "fp32")), load_external_data=False))
