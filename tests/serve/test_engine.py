"""The engine's host-side parts on a real tokenizer: rows turning tokens into streamed text and finishing (length,
end of utterance, stop strings), incremental detokenization, and the prefill-logits budget."""

import asyncio

import numpy as np
import pytest

from smolbox.preprocess import Preprocessor
from smolbox.serve.engine import GenRequest, IncrementalText, Row, prefill_fits


@pytest.fixture(scope="module")
def pre(random_export):
    return Preprocessor(random_export)


def test_incremental_text_equals_decoding_everything(pre):
    """Each row is detokenized incrementally (a short window per token, not the whole completion every step): the
    text only ever grows by appending, never ends in half a character, and ends equal to decoding all tokens at
    once, multibyte characters, odd spacing and random (also special) tokens included."""
    ids = lambda text: pre.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    rng = np.random.default_rng(0)
    sequences = [ids("Hello wörld — 日本語のテキスト 🙂, 12345."), ids("  spaced   out\n\n\ttabs ✓✓🙂🙂")]
    sequences += [rng.integers(0, pre.tokenizer.get_vocab_size(), 200).tolist() for _ in range(10)]
    for sequence in sequences:
        text, shown = IncrementalText(pre), ""
        for token in sequence:
            now = text.add(int(token))
            assert now.startswith(shown) and not now.endswith("\ufffd")
            shown = now
        assert text.final() == pre.decode(sequence) and text.final().startswith(shown)


def run_row(pre, tokens: list[int], **request) -> list[tuple]:
    """Feed `tokens` to one Row until it finishes; the events it posted, in order."""
    loop = asyncio.new_event_loop()
    try:
        job = GenRequest(encoded=None, prompt_tokens=0, events=asyncio.Queue(), loop=loop,
                         **{"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": [], **request})
        row = Row(job, pre)
        for token in tokens:
            row.add(int(token))
            if row.finished:
                break
        loop.run_until_complete(asyncio.sleep(0))  # deliver what the row posted (call_soon_threadsafe)
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
        return events
    finally:
        loop.close()


def streamed(events) -> str:
    return "".join(e[1] for e in events if e[0] == "token")


def test_rows_run_to_max_tokens_and_stream_their_whole_text(pre):
    """Random decodable tokens, as a random-weight model picks them: the row ends at max_tokens ("length"), its
    deltas join to the decoded completion, and usage counts every token."""
    specials = set(pre.tokenizer.get_added_tokens_decoder()) | set(pre.eos_token_ids)
    choices = np.array([i for i in range(pre.tokenizer.get_vocab_size()) if i not in specials])
    tokens = np.random.default_rng(1).choice(choices, 40).tolist()
    events = run_row(pre, tokens, max_tokens=32)
    assert [e[0] for e in events].count("first_token") == 1
    assert events[-1] == ("done", "length", 32)
    assert streamed(events) == pre.decode(tokens[:32])


def test_rows_stop_at_end_of_utterance_and_at_stop_strings(pre):
    answer = pre.tokenizer.encode(" The square is pink. Really pink.", add_special_tokens=False).ids
    eos = next(iter(pre.eos_token_ids))
    events = run_row(pre, [*answer, eos, *answer])
    assert events[-1] == ("done", "stop", len(answer) + 1)  # end of utterance counts as a generated token
    assert streamed(events) == pre.decode(answer)
    events = run_row(pre, answer, stop=["pink"])
    assert events[-1][:2] == ("done", "stop") and streamed(events) == " The square is "


def test_prefill_batches_stay_within_the_logits_budget():
    """A traced decoder returns logits for every prompt position; full-size prompts must not all prefill at once.
    The fused decoder returns the last position only, so 32 of them fit. (SmolVLM-Instruct's vocabulary.)"""
    vocab = 49155
    assert prefill_fits([1107] * 32, vocab, logits_all_positions=False)
    assert prefill_fits([1107] * 8, vocab, logits_all_positions=True)  # 8 image prompts: 1.6 GiB of logits
    assert not prefill_fits([1107] * 32, vocab, logits_all_positions=True)  # 32 of them crashed the CUDA provider
    assert not prefill_fits([100, 8192], vocab, logits_all_positions=True)
    assert prefill_fits([10**6], vocab, logits_all_positions=True)  # a lone request always runs
