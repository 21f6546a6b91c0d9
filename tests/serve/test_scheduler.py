"""The scheduler's rule (who starts in a step: batch room, prefill-token budget, KV capacity), the image cache, and
vision features encoded for several prompts in one call on a real export, which must give each prompt the tokens it
gets with its own pixels."""

import numpy as np
import pytest
from PIL import Image

from smolbox.config import ServeConfig
from smolbox.preprocess import Preprocessor, stack_tiles
from smolbox.runtime import OnnxVLM
from smolbox.serve.scheduler import LRUCache, image_parts, plan


def limits(**values) -> ServeConfig:
    return ServeConfig(**{"max_batch_size": 8, "max_prefill_tokens_per_step": 100, "max_kv_tokens": 1000, **values})


def test_newcomers_fill_the_prefill_budget_and_a_longer_one_runs_alone():
    assert plan([(40, 50), (40, 50), (40, 50)], running=2, kv_in_use=0, limits=limits()) == 2  # 80 of 100 tokens
    assert plan([(40, 50), (70, 80)], running=2, kv_in_use=0, limits=limits()) == 1  # the second waits a step
    assert plan([(500, 600), (10, 20)], running=2, kv_in_use=0, limits=limits()) == 1  # over the budget: alone
    assert plan([(10, 20)] * 10, running=5, kv_in_use=0, limits=limits()) == 3  # the batch has room for 3
    assert plan([(10, 20)] * 3, running=0, kv_in_use=0, limits=limits(), fits=lambda lengths: len(lengths) < 3) == 2
    # Without continuous batching a batch cannot take newcomers later: it starts as full as it can.
    assert plan([(40, 50), (70, 80)], running=0, kv_in_use=0, limits=limits(continuous_batching=False)) == 2


def test_kv_capacity_makes_newcomers_wait_in_arrival_order():
    assert plan([(10, 300)], running=3, kv_in_use=800, limits=limits()) == 0  # 1100 of 1000: waits
    assert plan([(10, 200)], running=3, kv_in_use=800, limits=limits()) == 1  # exactly full
    assert plan([(10, 150), (10, 100)], running=1, kv_in_use=800, limits=limits()) == 1
    assert plan([(10, 300), (10, 10)], running=1, kv_in_use=800, limits=limits()) == 0  # no overtaking
    assert plan([(10, 1000)], running=0, kv_in_use=0, limits=limits()) == 1  # the app refuses more than this (400)


def test_image_cache_keeps_the_recently_used_within_its_bytes():
    cache = LRUCache(max_bytes=3 * 400)  # three arrays of 100 float32
    for key in b"abc":
        cache.put(bytes([key]), np.full(100, key, np.float32))
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", np.zeros(100, np.float32))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and len(cache) == 3 and cache.bytes == 1200
    cache.put(b"big", np.zeros(1000, np.float32))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(b"big") is None and len(cache) == 3
    off = LRUCache(max_bytes=0)
    off.put(b"a", np.zeros(1, np.float32))
    assert off.get(b"a") is None and len(off) == 0


@pytest.mark.parametrize("on_cuda_path", [False, True])
def test_vision_features_of_several_prompts_in_one_call_give_the_tokens_of_each_alone(random_export, on_cuda_path):
    """Three prompts (two images of different sizes in one, the same image again in another) encoded in one
    vision-encoder call, each prompt's features spliced into its own prompt, decode to the same greedy tokens as each
    prompt prefilled with its own pixels. on_cuda_path: the I/O-binding path the runtime takes on CUDA, on the CPU."""
    pre = Preprocessor(random_export)
    model = OnnxVLM(random_export, "fp32", providers=["CPUExecutionProvider"])
    if on_cuda_path:
        model.bind_io, model.prefill_multiple = True, 16

    def prompt(question, *images):
        chat = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
        return pre.encode(pre.render_chat(chat), list(images))

    red, blue, wide = (Image.new("RGB", size, color) for size, color in (((48, 64), (200, 30, 30)), ((40, 40), (20, 20, 220)), ((96, 32), (10, 200, 90))))
    encoded = [prompt("Which colors?", red, wide), prompt("And this one?", blue), prompt("Again?", red)]
    assert encoded[0].image_pixels and sum(map(len, encoded[0].image_pixels)) == encoded[0].pixel_values.shape[1]

    def greedy(step, steps=8):
        tokens = []
        for _ in range(steps):
            tokens.append(step.logits.argmax(-1).astype(np.int64))
            step = model.decode(step, tokens[-1])
        return np.stack(tokens, axis=1)[0].tolist()

    alone = [greedy(model.prefill(e.input_ids, e.attention_mask, e.pixel_values, e.pixel_attention_mask)) for e in encoded]
    parts = [image_parts(e, b"export") for e in encoded]
    assert parts[0][0][0] == parts[2][0][0] and parts[0][0][0] != parts[1][0][0]  # same pixels, same key
    tiles = [t for p in parts for _, t in p]
    features = model.vision_features(*stack_tiles(tiles))
    assert features.shape[0] == sum(t.shape[0] for t in tiles)
    start, together = 0, []
    for e, p in zip(encoded, parts):
        count = sum(t.shape[0] for _, t in p)
        own = features[start:start + count]
        start += count
        together.append(greedy(model.prefill(e.input_ids, e.attention_mask, image_features=own)))
        alone_features = model.vision_features(e.pixel_values, e.pixel_attention_mask)
        np.testing.assert_allclose(own, alone_features, atol=1e-5)
    assert together == alone
