"""smolbox.serve.dequant: MatMulNBits' 4-bit weights dequantized equal what onnxruntime's kernel computes with, and
a slot decoder that prefills through them gives the 4-bit decoder's tokens."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from smolbox.config import load_config
from smolbox.serve.dequant import dequantize_4bit
from smolbox.serve.kv_decoder import load_runtime
from tests.prompts import left_padded_batch

CPU = ["CPUExecutionProvider"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dequantized_weights_reproduce_matmulnbits(dtype):
    """Random packed nibbles and block scales, K not a multiple of the block: A @ dequantize_4bit(...) is
    onnxruntime's MatMulNBits output (to float rounding)."""
    rng = np.random.default_rng(0)
    k, n, block = 40, 24, 32
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random((n, blocks)) * 0.1 + 0.01).astype(dtype)
    a = rng.standard_normal((5, k)).astype(dtype)
    onnx_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    node = helper.make_node("MatMulNBits", ["a", "b", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("a", onnx_type, [5, k])],
                              [helper.make_tensor_value_info("y", onnx_type, [5, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    expected = ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, {"a": a})[0].astype(np.float32)
    weight = dequantize_4bit(packed, scales, k, n, block)
    assert weight.shape == (k, n) and weight.dtype == dtype
    got = a.astype(np.float32) @ weight.astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 if dtype == np.float32 else 2e-2)


def test_a_dequantized_prefill_gives_the_4bit_decoders_tokens(random_export, processor_batch):
    """serve.prefill_dequantized on the q4 variant: a second session for prefills, while the decode step's graph keeps
    its 4-bit weights; prefills (two rows of different lengths in one call) give the first logits of the 4-bit decoder's prefill, and decoding on from there
    (through the 4-bit decoder) gives its greedy tokens."""
    serve = lambda **kw: load_config("tiny", overrides={"serve.model": str(random_export), "serve.max_batch_size": 3,  # noqa: E731
                                                        **{f"serve.{k}": v for k, v in kw.items()}}, env={}, dotenv=None).serve
    plain = load_runtime(random_export, "q4", serve(), CPU)
    dequantized = load_runtime(random_export, "q4", serve(prefill_dequantized=True), CPU)
    assert plain.prefill_session is None and dequantized.prefill_session is not None
    ops = {n.op_type for n in dequantized.derived.model.graph.node}
    assert "MatMulNBits" in ops  # the decode-step graph keeps its 4-bit weights

    def run(model, steps=10):
        step = model.prefill(processor_batch["input_ids"], processor_batch["attention_mask"],
                             processor_batch["pixel_values"], processor_batch["pixel_attention_mask"])
        first, tokens = step.logits.copy(), []
        for _ in range(steps):
            tokens.append(step.greedy.tolist())
            step = model.decode(step, step.greedy)
        model.release(step)
        return first, tokens

    (first, tokens), (first_dq, tokens_dq) = run(plain), run(dequantized)
    np.testing.assert_allclose(first_dq, first, rtol=0, atol=1e-4)
    assert tokens_dq == tokens


@pytest.fixture(scope="module")
def processor_batch(random_export):
    from transformers import AutoProcessor

    return {k: v.numpy() for k, v in left_padded_batch(AutoProcessor.from_pretrained(random_export)).items()}
