"""Probe for the next decoder design: onnxruntime's GroupQueryAttention with packed q|k|v, rotary inside, one
past/present buffer of fixed capacity per layer, and rows of different lengths told apart by seqlens_k only.

That is what a decode step needs to append to the cache in place (no concatenation, no padding surgery when
requests join or leave a batch) and to keep fixed shapes for CUDA graphs (docs/benchmarks.md, "What stands in the
way"). Two rows of different prompt lengths are prefilled one by one into their slots of the shared buffer, then
decoded together; every output is compared with a numpy reference (causal attention, rotate-half rotary).

    python -m experiments.gqa_probe        # prints the largest difference (CPU provider)
"""

from __future__ import annotations

import numpy as np

HEADS, HEAD_DIM, CAPACITY = 4, 16, 32
HIDDEN = HEADS * HEAD_DIM


def attention_graph():
    from onnx import TensorProto, helper

    node = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_length", "cos", "sin"],
        ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS, do_rotary=1)
    f32, cache = TensorProto.FLOAT, ["batch", HEADS, CAPACITY, HEAD_DIM]
    inputs = [helper.make_tensor_value_info("qkv", f32, ["batch", "new", 3 * HIDDEN]),
              helper.make_tensor_value_info("past_key", f32, cache), helper.make_tensor_value_info("past_value", f32, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos", f32, [CAPACITY, HEAD_DIM // 2]),
              helper.make_tensor_value_info("sin", f32, [CAPACITY, HEAD_DIM // 2])]
    outputs = [helper.make_tensor_value_info("out", f32, ["batch", "new", HIDDEN]),
               helper.make_tensor_value_info("present_key", f32, cache), helper.make_tensor_value_info("present_value", f32, cache)]
    model = helper.make_model(helper.make_graph([node], "gqa_probe", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def rotary_tables() -> tuple[np.ndarray, np.ndarray]:
    inverse_freq = 1.0 / (10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.arange(CAPACITY)[:, None] * inverse_freq[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def reference(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Causal self-attention over one row's tokens so far, qkv [tokens, 3 * hidden] -> [tokens, hidden]."""
    tokens = qkv.shape[0]
    q, k, v = (qkv[:, i * HIDDEN:(i + 1) * HIDDEN].reshape(tokens, HEADS, HEAD_DIM) for i in range(3))

    def rotate(x):
        c, s = cos[:tokens, None, :], sin[:tokens, None, :]
        first, second = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
        return np.concatenate([first * c - second * s, second * c + first * s], -1)

    scores = np.einsum("snh,tnh->nst", rotate(q), rotate(k)) / np.sqrt(HEAD_DIM)
    scores = np.where(np.tril(np.ones((tokens, tokens), bool))[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("nst,tnh->snh", weights, v).reshape(tokens, HIDDEN)


def main() -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(attention_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    cos, sin = rotary_tables()
    rng = np.random.default_rng(0)
    prompts, steps = [5, 9], 6
    streams = [rng.standard_normal((length + steps, 3 * HIDDEN)).astype(np.float32) for length in prompts]
    keys = np.zeros((len(prompts), HEADS, CAPACITY, HEAD_DIM), np.float32)
    values = np.zeros_like(keys)
    worst = 0.0
    for row, length in enumerate(prompts):  # prefill: one request at a time into its slot
        out, keys[row:row + 1], values[row:row + 1] = session.run(None, {
            "qkv": streams[row][None, :length], "past_key": keys[row:row + 1], "past_value": values[row:row + 1],
            "seqlens_k": np.array([length - 1], np.int32), "total_length": np.array(length, np.int32), "cos": cos, "sin": sin})
        worst = max(worst, float(np.abs(out[0] - reference(streams[row][:length], cos, sin)).max()))
    for step in range(steps):  # decode: both rows in one batch, each at its own length
        qkv = np.stack([streams[row][length + step] for row, length in enumerate(prompts)])[:, None]
        seqlens = np.array([length + step for length in prompts], np.int32)  # tokens so far - 1, per row
        out, keys, values = session.run(None, {"qkv": qkv, "past_key": keys, "past_value": values, "seqlens_k": seqlens,
                                               "total_length": np.array(seqlens.max() + 1, np.int32), "cos": cos, "sin": sin})
        for row, length in enumerate(prompts):
            expected = reference(streams[row][:length + step + 1], cos, sin)[-1]
            worst = max(worst, float(np.abs(out[row, 0] - expected).max()))
    print(f"GroupQueryAttention, fixed-capacity cache ({CAPACITY}), rows of {prompts} tokens + {steps} steps: "
          f"max |diff| vs reference {worst:.2e}; present keeps the capacity: {keys.shape}")


if __name__ == "__main__":
    main()
