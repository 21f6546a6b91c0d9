"""smolbox.runtime's continuous batching on real exports: rows join and leave a running batch and still get the tokens
they get alone, on the CPU path and on what the runtime does on CUDA."""

import numpy as np
import pytest

from smolbox.export.parity import parity_inputs
from smolbox.runtime import OnnxVLM
from tests.prompts import left_padded_batch


@pytest.mark.parametrize("decoder,on_cuda_path", [("fused", False), pytest.param("traced", False, marks=pytest.mark.slow),
                                                  ("fused", True)])
def test_rows_join_and_leave_a_running_batch(request, merged, decoder, on_cuda_path):
    """Continuous batching (smolbox.runtime select/merge): a request prefilled while another is decoding joins its
    batch, finished rows leave; every row's greedy tokens equal those of the request generated alone. on_cuda_path
    runs, on the CPU, what the runtime does on CUDA: I/O binding (embeddings, image features and cache as
    OrtValues in device memory, the features placed by a small graph) and prompts left-padded to a multiple of 16."""
    tiny_export = request.getfixturevalue("tiny_export" if decoder == "fused" else "tiny_export_traced")
    _, processor = merged
    runtime = OnnxVLM(tiny_export.folder, "fp32", providers=["CPUExecutionProvider"])
    if on_cuda_path:
        runtime.bind_io, runtime.prefill_multiple = True, 16
    single = {k: v.numpy() for k, v in parity_inputs(processor, 1)[0].items()}
    pair = {k: v.numpy() for k, v in left_padded_batch(processor).items()}

    def argmax_tokens(inputs, steps):
        """Greedy tokens past the end of the answer, as the rows below are decoded (the pretrained tiny model ends
        an answer in a few tokens; generate would pad after it)."""
        step = runtime.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        tokens = []
        for _ in range(steps):
            tokens.append(step.logits.argmax(-1).astype(np.int64))
            step = runtime.decode(step, tokens[-1])
        return np.stack(tokens, axis=1)

    alone = [argmax_tokens(single, 12)[0]]
    both = argmax_tokens(pair, 12)
    alone += [both[0], both[1]]

    produced = [[], [], []]
    step = runtime.prefill(single["input_ids"], single["attention_mask"], single["pixel_values"], single["pixel_attention_mask"])
    if on_cuda_path:
        assert single["input_ids"].shape[1] % 16 and step.attention_mask.shape[1] % 16 == 0, "the prompt was padded"
    owners = [0]  # which request each batch row belongs to
    for t in range(14):
        tokens = step.logits.argmax(-1).astype(np.int64)
        for row, owner in enumerate(owners):
            produced[owner].append(int(tokens[row]))
        if t == 3:  # the pair arrives: prefilled on its own (different length), then joins
            joined = runtime.prefill(pair["input_ids"], pair["attention_mask"], pair["pixel_values"], pair["pixel_attention_mask"])
            step = runtime.decode(step, tokens)
            for row, owner in enumerate([1, 2]):
                produced[owner].append(int(joined.logits[row].argmax()))
            step = runtime.merge(step, runtime.decode(joined, joined.logits.argmax(-1).astype(np.int64)))
            owners += [1, 2]
            continue
        if t == 7:  # request 0 leaves; its (longer) prompt's columns go with it
            keep = [1, 2]
            padding_only = int(np.argmax(step.attention_mask[keep].any(0)))  # leading columns no kept row uses
            length = step.attention_mask.shape[1]
            step, tokens, owners = runtime.select(step, keep), tokens[keep], [owners[i] for i in keep]
            assert step.attention_mask.shape[1] == length - padding_only and step.attention_mask.any(0)[0]
        step = runtime.decode(step, tokens)
    for owner, expected in enumerate(alone):
        n = min(len(produced[owner]), len(expected))
        np.testing.assert_array_equal(produced[owner][:n], expected[:n], err_msg=f"request {owner}")
        assert n >= 8
