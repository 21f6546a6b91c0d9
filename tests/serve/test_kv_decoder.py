"""The server's derived decoder (smolbox.serve.kv_decoder): GroupQueryAttention over fixed KV slots gives the tokens
of the published decoder and of PyTorch, for rows of different lengths decoded together and for rows joining and
leaving a running batch; the export folder is left as it is."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from smolbox.config import ConfigError, load_config
from smolbox.runtime import OnnxVLM
from smolbox.serve.kv_decoder import UNMASKED_VISION, SlotVLM, _runs, load_runtime
from tests.prompts import left_padded_batch

CPU = ["CPUExecutionProvider"]
STEPS = 12


@pytest.fixture(scope="module")
def processor(random_export):
    return AutoProcessor.from_pretrained(random_export)


@pytest.fixture(scope="module")
def pair(processor):
    """Two image prompts of different lengths, left-padded into one batch (numpy)."""
    return {k: v.numpy() for k, v in left_padded_batch(processor).items()}


def serve_config(folder, **serve):
    overrides = {"serve.model": str(folder), "serve.max_batch_size": 3,
                 **{f"serve.{k}": v for k, v in serve.items()}}
    return load_config("tiny", overrides=overrides, env={}, dotenv=None).serve


def slots(folder, variant):
    model = load_runtime(folder, variant, serve_config(folder), CPU)
    assert isinstance(model, SlotVLM) and not model.cuda_graph
    assert model.capacity == 2048  # max_prompt_tokens + max_tokens_limit, within the rotary tables' 2048 positions
    return model


def greedy(model, inputs, steps=STEPS) -> np.ndarray:
    """argmax tokens for `steps` steps (no stopping at end of utterance: random weights answer on and on)."""
    step = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), inputs.get("pixel_attention_mask"))
    tokens = []
    for _ in range(steps):
        tokens.append(step.logits.argmax(-1).astype(np.int64))
        if len(tokens) < steps:
            step = model.decode(step, tokens[-1])
    model.release(step)
    return np.stack(tokens, axis=1)


@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_rows_of_different_lengths_decode_together(random_export, pair, variant):
    """Two rows of different prompt lengths (left-padded batch, images) prefilled into two slots and decoded
    together: the tokens of the published decoder's runtime, and for fp32 those of PyTorch's greedy generate."""
    model = slots(random_export, variant)
    tokens = greedy(model, pair)
    assert model.free == {0, 1, 2}, "the slots are free again"
    reference = OnnxVLM(random_export, variant, providers=CPU)
    assert tokens.tolist() == greedy(reference, pair).tolist()
    assert model.generate(pair["input_ids"], pair["attention_mask"], pair["pixel_values"], pair["pixel_attention_mask"],
                          max_new_tokens=STEPS).tolist() == reference.generate(
        pair["input_ids"], pair["attention_mask"], pair["pixel_values"], pair["pixel_attention_mask"], max_new_tokens=STEPS).tolist()
    if variant == "fp32":
        torch_model = AutoModelForImageTextToText.from_pretrained(random_export, dtype=torch.float32).eval()
        with torch.no_grad():
            out = torch_model.generate(**{k: torch.from_numpy(v) for k, v in pair.items()}, max_new_tokens=STEPS, do_sample=False,
                                       min_new_tokens=STEPS)
        assert tokens.tolist() == out[:, pair["input_ids"].shape[1]:].numpy().tolist()


@pytest.mark.parametrize("variant,graph_path,bind_io", [("fp32", False, False), ("q4", False, False), ("fp32", True, False),
                                                     ("fp32", False, True)])
def test_rows_join_mid_generation_and_leave_early(random_export, pair, variant, graph_path, bind_io):
    """Request A decodes alone; B (a different, shorter prompt) is prefilled into a free slot while A is mid-generation
    and joins; A leaves early and its slot is reused by C, a copy of A, which joins B. Every request's tokens
    equal those it gets alone, and the slots come back free. graph_path runs, on the CPU, the decode step the CUDA
    graphs replay: the slots of the smallest batch bucket that holds the rows, that bucket's fixed input/output
    buffers (embeddings written into the decoder's input buffer, lengths copied in place), total_sequence_length
    fixed at the capacity. bind_io runs CUDA's decode step without a graph: the step's embeddings an OrtValue left
    in device memory (kv_slots_bench's "slots" runtime; its shape is a method there, not a tuple)."""
    model = slots(random_export, variant)
    alone_model = model
    if graph_path or bind_io:
        model = slots(random_export, variant)
        model.cuda_graph, model.bind_io = graph_path, bind_io
    a = {k: v[:1] for k, v in pair.items()}  # row 0 of the pair (its padding and padding image included)
    b = {k: v[1:] for k, v in pair.items()}
    alone = {"a": greedy(alone_model, a)[0].tolist(), "b": greedy(alone_model, b)[0].tolist()}
    produced = {"a": [], "b": [], "c": []}
    leave_after = {"a": 7, "b": STEPS, "c": STEPS}
    step, owners = model.prefill(a["input_ids"], a["attention_mask"], a["pixel_values"], a["pixel_attention_mask"]), ["a"]
    for t in range(40):
        tokens = step.greedy  # on the graph path the graph's ArgMax, the logits left in its buffer
        assert tokens.tolist() == step.logits.argmax(-1).tolist()
        for row, owner in enumerate(owners):
            produced[owner].append(int(tokens[row]))
        keep = [i for i, o in enumerate(owners) if len(produced[o]) < leave_after[o]]
        if len(keep) < len(owners):  # finished rows leave; their slots are free again
            step, owners, tokens = model.select(step, keep), [owners[i] for i in keep], tokens[keep]
            assert len(model.free) == 3 - len(owners)
        if not owners:
            break
        step = model.decode(step, tokens)
        for when, name, inputs in ((2, "b", b), (8, "c", a)):
            if t == when:  # a newcomer is prefilled into a free slot (C: A's) and joins the running batch
                joined = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"])
                if name == "c":
                    assert joined.slots == [0]
                step, owners = model.merge(step, joined), owners + [name]
    model.release(step)
    assert produced == {"a": alone["a"][:7], "b": alone["b"], "c": alone["a"]}
    assert set(model._graphs) == ({1, 2} if graph_path else set())  # slots 0-1 at most: buckets 1 and 2 of [1, 2, 3]
    assert model.free == {0, 1, 2}


def test_graph_path_buckets_as_rows_join_and_leave(random_export, pair):
    """Five slots (CUDA-graph buckets 1, 2, 4, 5): rows join one at a time (1 -> 2 -> 3 -> 4 -> 5 rows: buckets
    1, 2, 4, 4, 5) and leave highest slot first (back through 4, 2 to 1). On the graph path (each bucket its own
    fixed buffers, bound over the first slots of the shared KV buffers) every request's tokens equal those of the
    slot decoder without the graph on the same schedule and those of the published decoder alone."""
    config = serve_config(random_export, max_batch_size=5)
    graph, plain = (load_runtime(random_export, "fp32", config, CPU) for _ in range(2))
    graph.cuda_graph = True
    assert graph.buckets == [1, 2, 4, 5]
    prompts = [{k: v[i % 2:i % 2 + 1] for k, v in pair.items()} for i in range(5)]  # A, B, A, B, A (rows of the pair)
    steps = [20, 17, 14, 11, 8]  # request i joins at step 2i and leaves at 2i + steps - 1: the highest slot first

    def run(model):
        produced, buckets, owners, step = [[] for _ in prompts], [], [], None
        for t in range(40):
            if t % 2 == 0 and t // 2 < len(prompts):  # a newcomer takes the lowest free slot: its own index
                p = prompts[t // 2]
                joined = model.prefill(p["input_ids"], p["attention_mask"], p["pixel_values"], p["pixel_attention_mask"])
                assert joined.slots == [t // 2]
                step, owners = (joined if step is None else model.merge(step, joined)), owners + [t // 2]
            tokens = step.greedy  # the logits are never read here: on the graph path they stay in its buffer
            for row, owner in enumerate(owners):
                produced[owner].append(int(tokens[row]))
            keep = [i for i, o in enumerate(owners) if len(produced[o]) < steps[o]]
            if len(keep) < len(owners):
                step, owners, tokens = model.select(step, keep), [owners[i] for i in keep], tokens[keep]
            if not owners:
                break
            buckets.append(graph.bucket(max(step.slots) + 1))
            step = model.decode(step, tokens)
        assert model.free == set(range(5))
        return produced, buckets

    produced, buckets = run(graph)
    assert [b for i, b in enumerate(buckets) if i == 0 or b != buckets[i - 1]] == [1, 2, 4, 5, 4, 2, 1]
    assert set(graph._graphs) == {1, 2, 4, 5}
    assert run(plain)[0] == produced
    reference = OnnxVLM(random_export, "fp32", providers=CPU)
    assert produced == [greedy(reference, p, n)[0].tolist() for p, n in zip(prompts, steps)]


def test_a_graph_steps_logits_are_read_from_its_buffer_only_until_the_buckets_next_step(random_export, pair):
    """A decode step on the graph path brings its greedy tokens (the graph's ArgMax) to the host, not its logits:
    those are copied when first read, and reading them after the bucket's next step overwrote its buffer raises
    instead of returning another step's logits."""
    model = slots(random_export, "fp32")
    model.cuda_graph = True
    a = {k: v[:1] for k, v in pair.items()}
    first = model.decode(model.prefill(a["input_ids"], a["attention_mask"], a["pixel_values"], a["pixel_attention_mask"]),
                         np.array([7]))
    kept = model.select(first, [0])  # a view of the same step
    second = model.decode(first, first.greedy)
    with pytest.raises(RuntimeError, match="overwritten"):
        _ = kept.logits
    assert second.greedy.tolist() == second.logits.argmax(-1).tolist()
    model.release(second)


def test_a_cached_prompt_is_copied_into_a_slot_and_decodes_as_its_own_prefill(random_export, pair):
    """The prompt cache: a prefilled prompt kept (`remember`) and later copied into another slot (`reuse`) while
    another row decodes gives that prompt's first logits and then the tokens it gets alone; an entry is the prompt's
    length of every layer's keys and values, and a cache too small for one keeps nothing."""
    model = load_runtime(random_export, "fp32", serve_config(random_export, prompt_cache_mb=64), CPU)
    a = {k: v[:1] for k, v in pair.items()}
    b = {k: v[1:] for k, v in pair.items()}
    step = model.prefill(a["input_ids"], a["attention_mask"], a["pixel_values"], a["pixel_attention_mask"])
    first_logits, length = step.logits[0].copy(), int(model.lengths[step.slots[0]])
    assert model.remember([b"a"], step) == 1 and model.remember([b"a"], step) == 0  # kept once
    assert model.prompt_cache.bytes == length * model.slot_bytes // model.capacity * len(model.cache_names)
    alone = []
    for _ in range(STEPS):
        alone.append(int(step.greedy[0]))
        step = model.decode(step, step.greedy)
    model.release(step)

    running = model.prefill(b["input_ids"], b["attention_mask"], b["pixel_values"], b["pixel_attention_mask"])
    running = model.decode(running, running.greedy)
    reused = model.reuse([b"a"])
    assert reused.slots == [1] and model.lengths[1] == length
    np.testing.assert_array_equal(reused.logits[0], first_logits)
    step, produced = model.merge(running, reused), []
    for _ in range(STEPS):
        produced.append(int(step.greedy[1]))
        step = model.decode(step, step.greedy)
    model.release(step)
    assert produced == alone and model.free == {0, 1, 2}

    small = load_runtime(random_export, "fp32", serve_config(random_export, prompt_cache_mb=0.001), CPU)
    step = small.prefill(a["input_ids"], a["attention_mask"], a["pixel_values"], a["pixel_attention_mask"])
    assert small.remember([b"a"], step) == 0 and len(small.prompt_cache) == 0
    with pytest.raises(KeyError):
        small.reuse([b"a"])
    assert small.free == {1, 2}, "a failed reuse takes no slot"


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_the_published_decoder_when_kv_slots_are_off_and_slots_that_hold_every_request(random_export):
    model = load_runtime(random_export, "fp32", serve_config(random_export, kv_slots=False), CPU)
    assert type(model) is OnnxVLM
    # fp32 caches asked on CUDA (onnxruntime falls back to the CPU here): CUDA's GroupQueryAttention is fp16 only
    model = load_runtime(random_export, "fp32", serve_config(random_export), ["CUDAExecutionProvider", *CPU])
    assert type(model) is OnnxVLM
    with pytest.raises(ConfigError, match="kv_capacity_tokens"):
        serve_config(random_export, kv_capacity_tokens=1000, max_prompt_tokens=1000, max_tokens_limit=10)
    assert serve_config(random_export, kv_capacity_tokens=1010, max_prompt_tokens=1000, max_tokens_limit=10).kv_capacity_tokens == 1010


@pytest.mark.parametrize("variant", ["fp16", "q8", "q4f16", "int8"])
def test_every_variant_derives(random_export, pair, variant):
    """fp16 and q4f16 carry fp16 caches (and fp16 rotary tables), q8 MatMulNBits at 8 bits, int8 a dequantized
    product before the Split: each derives, and its slots give the published decoder's tokens for the pair. int8
    quantizes activations with one scale per call, so its tokens depend on what shares a call (the padded pair's
    prefill is one call, the slots' two): it is compared on one row without padding, where the calls are the same."""
    model = slots(random_export, variant)
    assert model.cache_dtype == (np.float16 if variant in ("fp16", "q4f16") else np.float32)
    inputs = pair
    if variant == "int8":
        real = pair["attention_mask"][0] == 1
        inputs = {k: v[:1][:, real] if k in ("input_ids", "attention_mask") else v[:1] for k, v in pair.items()}
    assert greedy(model, inputs).tolist() == greedy(OnnxVLM(random_export, variant, providers=CPU), inputs).tolist()


def test_capturing_every_bucket_graph_leaves_the_slots_and_the_tokens_as_they_were(random_export, pair):
    """capture_graphs (run at load on CUDA) steps every batch bucket a few times: on the CPU without a graph it does
    nothing; on the graph path (run here on the CPU) it makes every bucket's fixed binding, and neither at load nor in
    the middle of a generation does it change lengths, free slots or the greedy tokens (which a decode step brings
    back with it: the logits stay in the bucket's buffer, which the capture's steps overwrite)."""
    plain = slots(random_export, "fp32")
    assert plain.capture_graphs() == 0.0 and plain._graphs == {}
    expected = greedy(plain, pair)
    graph = slots(random_export, "fp32")
    graph.cuda_graph = True
    graph.capture_graphs()
    assert set(graph._graphs) == set(graph.buckets) == {1, 2, 3}
    assert graph.free == {0, 1, 2} and not graph.lengths.any()
    assert greedy(graph, pair).tolist() == expected.tolist()
    # mid-generation: both rows hold tokens when the buckets run again
    step = graph.prefill(pair["input_ids"], pair["attention_mask"], pair["pixel_values"], pair["pixel_attention_mask"])
    tokens = [step.greedy]
    for t in range(1, STEPS):
        step = graph.decode(step, tokens[-1])
        if t == 4:  # the step's greedy tokens came back with it; its logits are overwritten (they would raise)
            lengths, free = graph.lengths.copy(), set(graph.free)
            graph.capture_graphs()
            assert graph.lengths.tolist() == lengths.tolist() and graph.free == free
        tokens.append(step.greedy)
    graph.release(step)
    assert np.stack(tokens, axis=1).tolist() == expected.tolist()


@pytest.fixture(scope="module")
def texts(processor):
    """Three text prompts of different lengths, left-padded into one batch (numpy)."""
    prompts = ["Hi?", "Tell me a story about a red square and a green circle.", "Why is the sky blue, in two words?"]
    chats = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}], add_generation_prompt=True)
             for t in prompts]
    batch = processor(text=chats, padding=True, padding_side="left", return_tensors="np")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def one_at_a_time(model, inputs, steps=STEPS):
    """Each row prefilled alone (its own decoder call) and decoded alone: (first-step logits, greedy tokens) per row."""
    logits, tokens = [], []
    for i in range(inputs["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        step = model.prefill(row["input_ids"], row["attention_mask"], row.get("pixel_values"), row.get("pixel_attention_mask"))
        logits.append(step.logits[0])
        model.release(step)
        tokens.append(greedy(model, row, steps)[0].tolist())
    return np.stack(logits), tokens


@pytest.mark.parametrize("variant", ["fp32", "q4"])
@pytest.mark.parametrize("prompts", ["pair", "texts"])
def test_newcomers_prefill_in_one_call_as_one_row_at_a_time(random_export, request, variant, prompts):
    """Rows of different lengths (with images: the pair; without: three texts) prefilled together go into
    consecutive slots in one decoder call, right-padded; each row's logits and greedy tokens equal those of the row
    prefilled alone, and for fp32 PyTorch's greedy generate."""
    inputs = request.getfixturevalue(prompts)
    model = slots(random_export, variant)
    calls = []
    run = model._run_decoder
    model._run_decoder = lambda embeds, *a: calls.append(embeds.shape[:2]) or run(embeds, *a)
    step = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), inputs.get("pixel_attention_mask"))
    rows = inputs["input_ids"].shape[0]
    lengths = inputs["attention_mask"].sum(axis=1)
    assert calls == [(rows, lengths.max())] and step.slots == list(range(rows))
    assert model.lengths[:rows].tolist() == lengths.tolist()
    model.release(step)
    model._run_decoder = run
    together = greedy(model, inputs)
    alone_logits, alone_tokens = one_at_a_time(model, inputs)
    np.testing.assert_allclose(step.logits, alone_logits, rtol=1e-4, atol=1e-4)
    assert together.tolist() == alone_tokens
    assert model.free == set(range(3))
    if variant == "fp32":
        torch_model = AutoModelForImageTextToText.from_pretrained(random_export, dtype=torch.float32).eval()
        with torch.no_grad():
            out = torch_model.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=STEPS,
                                       do_sample=False, min_new_tokens=STEPS)
        assert together.tolist() == out[:, inputs["input_ids"].shape[1]:].numpy().tolist()


def test_newcomers_in_slots_that_are_not_consecutive_prefill_in_runs(random_export, texts):
    """Slot 1 is busy (its row decodes on) while slots 0 and 2 are free: two newcomers take them in two calls (one per
    run of consecutive slots), and every row's tokens equal those it gets alone."""
    assert _runs([0, 2, 3, 4, 7]) == [(0, 1), (1, 4), (4, 5)]
    model = slots(random_export, "fp32")
    _, alone = one_at_a_time(model, texts)
    first = model.prefill(texts["input_ids"][:2], texts["attention_mask"][:2])  # rows 0, 1 -> slots 0, 1
    produced = {0: [], 1: [], 2: []}
    tokens = first.logits.argmax(-1).astype(np.int64)
    for row, token in zip((0, 1), tokens):
        produced[row].append(int(token))
    step = model.select(first, [1])  # row 0 leaves after one token: slot 0 free, slot 1 busy, slot 2 free
    assert model.free == {0, 2}
    step = model.decode(step, tokens[[1]])
    calls = []
    run = model._run_decoder
    model._run_decoder = lambda embeds, seqlens, first_slot, *a: calls.append(first_slot) or run(embeds, seqlens, first_slot, *a)
    joined = model.prefill(texts["input_ids"][[0, 2]], texts["attention_mask"][[0, 2]])  # row 0 again, and row 2
    model._run_decoder = run
    assert joined.slots == [0, 2] and calls == [0, 2]
    step, owners = model.merge(step, joined), [1, 0, 2]
    produced[0] = []
    while True:
        tokens = step.logits.argmax(-1).astype(np.int64)
        for i, owner in enumerate(owners):
            produced[owner].append(int(tokens[i]))
        if all(len(produced[o]) >= STEPS for o in owners):
            break
        step = model.decode(step, tokens)
    model.release(step)
    assert [produced[r][:STEPS] for r in range(3)] == alone
    assert model.free == {0, 1, 2}


def test_one_call_per_newcomer_without_batch_prefill_or_past_the_cpu_scratch_budget(random_export, texts, monkeypatch):
    """serve.batch_prefill=false prefills each newcomer in a call of its own, and so does the CPU when a batched
    call's attention scores would pass PREFILL_SCRATCH_BYTES; the tokens are those of the batched call."""
    from smolbox.serve import kv_decoder

    model = slots(random_export, "fp32")
    expected = greedy(model, texts)
    lengths = texts["attention_mask"].sum(axis=1)
    assert model._prefill_calls([0, 1, 2], lengths) == [(0, 3)]
    single = load_runtime(random_export, "fp32", serve_config(random_export, batch_prefill=False), CPU)
    assert single._prefill_calls([0, 1, 2], lengths) == [(0, 1), (1, 2), (2, 3)]
    assert greedy(single, texts).tolist() == expected.tolist()
    per_row = model.derived.heads * model.capacity * 4
    monkeypatch.setattr(kv_decoder, "PREFILL_SCRATCH_BYTES", 2 * per_row * int(lengths.min()) - 1)  # never two rows
    assert model._prefill_calls([0, 1, 2], lengths) == [(0, 1), (1, 2), (2, 3)]
    assert greedy(model, texts).tolist() == expected.tolist()


def test_newcomers_take_consecutive_slots_when_that_widens_no_decode_step(random_export, texts):
    """Five slots (graph buckets 1, 2, 4, 5; the graph path run on the CPU). Busy 1 and 4: two newcomers take 2-3
    (one call, bucket 4 as 0 and 2 would be) rather than 0 and 2. Busy 0 and 2: 1 and 3 (bucket 4) rather than 3-4
    (bucket 5). Without a graph the lowest slots always (no higher slot). Tokens equal each row's alone."""
    config = serve_config(random_export, max_batch_size=5)
    model = load_runtime(random_export, "fp32", config, CPU)
    _, alone = one_at_a_time(model, texts)
    model.cuda_graph = True
    for busy, expected in (({1, 4}, [2, 3]), ({0, 2}, [1, 3])):
        model.free = set(range(5)) - busy
        assert model._take(2) == expected
        step = model.prefill(texts["input_ids"][:2], texts["attention_mask"][:2])
        assert step.slots == expected
        tokens = [step.logits.argmax(-1).astype(np.int64)]
        for _ in range(STEPS - 1):
            step = model.decode(step, tokens[-1])
            tokens.append(step.logits.argmax(-1).astype(np.int64))
        model.release(step)
        assert np.stack(tokens, axis=1).tolist() == alone[:2]
    model.cuda_graph = False
    model.free = {0, 2, 3, 4}
    assert model._take(2) == [0, 2]


def test_tiles_without_padding_go_through_the_vision_encoder_without_its_mask(random_export, pair):
    """derive.vision_without_mask: tiles whose pixel mask is all true (all-padding tiles of a batch aside) run the
    vision encoder without its attention mask and get the export's features; a tile with padding inside runs the
    export's graph."""
    model = slots(random_export, "fp32")
    exported = model.sessions["vision_encoder"]
    pixels, mask = pair["pixel_values"], pair["pixel_attention_mask"].astype(bool)
    tiles = mask.reshape(-1, *mask.shape[-2:])
    assert not tiles.any(axis=(1, 2)).all(), "the pair's batch has an all-padding tile"
    assert model.vision_graph(mask) == UNMASKED_VISION != "vision_encoder"
    features = model.vision_features(pixels, mask)
    expected = exported.run(None, {"pixel_values": pixels, "pixel_attention_mask": mask})[0]
    assert features.shape == expected.shape
    np.testing.assert_allclose(features, expected, atol=1e-4)

    padded = mask.copy()
    padded[0, 0, :, -5:] = False  # the first tile's right edge is padding
    assert model.vision_graph(padded) == "vision_encoder"
    assert np.array_equal(model.vision_features(pixels, padded),
                          exported.run(None, {"pixel_values": pixels, "pixel_attention_mask": padded})[0])
