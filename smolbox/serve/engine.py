"""The serving engine: one thread owns the ONNX sessions and generates for every waiting request together.

Requests wait in a bounded queue. When nothing runs, the engine takes up to serve.max_batch_size of them, prefills
them as one left-padded batch and decodes them together with the KV cache kept on the device. Each step samples a
token for every row, lets finished rows leave and lets waiting requests, prefilled on their own, join the batch
(continuous batching). A row turns its tokens into streamed text and decides when it is done.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers.decoders import DecodeStream

from ..config import Config
from ..onnx_layout import available_variants
from ..preprocess import Encoded, Preprocessor, pad_batch
from ..runtime import OnnxVLM, Step, default_providers
from .kv_decoder import load_runtime
from .metrics import Metrics

log = logging.getLogger("smolbox.serve")

PREFILL_LOGITS_BUDGET = 2 * 2**30  # bytes of prefill logits one batch may produce; a lone request always runs


@dataclass
class GenRequest:
    """One validated chat completion request, ready for the engine."""

    encoded: Encoded
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    events: asyncio.Queue  # the engine posts ("token", text_delta) / ("done", finish_reason, completion_tokens)
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def resolve_variant(choice: str, folder: Path, providers: list[str] | None) -> str:
    """serve.variant=auto: q4 with fp16 activations on a GPU, q4 on the CPU (fp16 arithmetic is slow there),
    else the first variant the export has."""
    if choice != "auto":
        return choice
    on_cuda = "CUDAExecutionProvider" in (providers or default_providers())
    available = available_variants(folder)
    for preferred in (["q4f16", "q4"] if on_cuda else ["q4"]) + available:
        if preferred in available:
            return preferred
    raise FileNotFoundError(f"{folder / 'onnx'} holds no complete ONNX variant")


def preload_cuda_libraries() -> None:
    """onnxruntime-gpu from PyPI finds the CUDA/cuDNN libraries of the nvidia-* wheels only after this call."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - CPU fallback below is reported on /health
            log.warning("serve: could not preload CUDA libraries: %s", exc)


def prefill_fits(prompt_tokens: list[int], vocab_size: int, logits_all_positions: bool) -> bool:
    """Whether prompts of these lengths may prefill as one batch. A traced decoder returns fp32 logits for every
    prompt position, rows x longest prompt x vocabulary, and on a GPU a batch of full-size image prompts (7 GB of
    logits) crashed onnxruntime's CUDA provider and the server with it (docs/benchmarks.md, "Serving"); the fused
    decoder returns the last position only. A lone request always runs."""
    longest = max(prompt_tokens) if logits_all_positions else 1
    return len(prompt_tokens) == 1 or len(prompt_tokens) * longest * vocab_size * 4 <= PREFILL_LOGITS_BUDGET


class QueueFull(Exception):
    pass


class Engine:
    """Owns the ONNX sessions; one thread batches waiting requests and generates for them together."""

    def __init__(self, cfg: Config, folder: Path, metrics: Metrics):
        self.cfg, self.folder, self.metrics = cfg, folder, metrics
        self.queue: queue.Queue[GenRequest] = queue.Queue()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error: str | None = None
        self.model: OnnxVLM | None = None
        self.preprocessor: Preprocessor | None = None
        self.pending: GenRequest | None = None  # a request that did not fit the last prefill goes first next time
        self.thread = threading.Thread(target=self._main, name="smolbox-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def submit(self, request: GenRequest) -> None:
        if self.queue.qsize() >= self.cfg.serve.max_queue:
            raise QueueFull()
        self.queue.put(request)
        self.metrics.queue_depth.set(self.queue.qsize())

    def _main(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - reported on /health and in the log
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("serve: loading %s failed: %s", self.folder, self.error)
            return
        active: Batch | None = None
        while not self.stopping.is_set():
            if active is None:
                active = self._admit(block=True, room=self.cfg.serve.max_batch_size)
                continue
            try:
                active = self._advance(active)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the server down
                log.exception("serve: generation failed")
                _fail([row.request for row in active.rows if not row.finished], exc)
                self.model.release(active.step)
                active = None

    def _take(self, block: bool, room: int) -> list[GenRequest]:
        """Waiting requests for one prefill: up to `room`, within the prefill-logits budget. Blocking (nothing is
        running) waits for a first request and then up to serve.batch_wait_ms for more."""
        batch: list[GenRequest] = []
        deadline = time.perf_counter() + self.cfg.serve.batch_wait_ms / 1000
        while len(batch) < room:
            if self.pending is not None:
                request, self.pending = self.pending, None
            else:
                try:
                    if block and not batch:
                        request = self.queue.get(timeout=0.1)
                    elif block:
                        request = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                    else:
                        request = self.queue.get_nowait()
                except queue.Empty:
                    break
            lengths = [r.prompt_tokens for r in [*batch, request]]
            if batch and not prefill_fits(lengths, self.model.vocab_size, self.model.logits_all_positions):
                self.pending = request
                break
            batch.append(request)
        self.metrics.queue_depth.set(self.queue.qsize())
        return batch

    def _admit(self, block: bool, room: int) -> Batch | None:
        """Prefill waiting requests as a new batch (None when there are none, or their prefill failed)."""
        requests = self._take(block, room) if room > 0 else []
        if not requests:
            return None
        self.metrics.batch_size.observe(len(requests))
        try:
            inputs = pad_batch([r.encoded for r in requests], self.preprocessor.pad_token_id)
            step = self.model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), inputs.get("pixel_attention_mask"))
        except Exception as exc:  # noqa: BLE001 - these requests fail, the running batch goes on
            log.exception("serve: prefill failed")
            _fail(requests, exc)
            return None
        return Batch(step, [Row(r, self.preprocessor) for r in requests])

    def _advance(self, batch: Batch) -> Batch | None:
        """One token for every row (continuous batching): sample from the current logits, let finished rows
        leave, decode one step, and let waiting requests join the running batch once they are prefilled."""
        model = self.model
        tokens = batch.step.logits.argmax(-1).astype(np.int64)  # greedy rows: one call for the batch
        for i, row in enumerate(batch.rows):
            if row.request.temperature != 0.0:
                tokens[i] = sample(batch.step.logits[i], row.request.temperature, row.request.top_p, row.rng)
            row.add(int(tokens[i]))
        keep = [i for i, row in enumerate(batch.rows) if not row.finished]
        if not keep:
            model.release(batch.step)
            self.metrics.decoding.set(0)
            return self._admit(block=False, room=self.cfg.serve.max_batch_size)
        step = batch.step if len(keep) == len(batch.rows) else model.select(batch.step, keep)
        rows = [batch.rows[i] for i in keep]
        step = model.decode(step, tokens[keep])
        room = self.cfg.serve.max_batch_size - len(rows) if self.cfg.serve.continuous_batching else 0
        newcomers = self._admit(block=False, room=room)
        if newcomers is not None:
            try:
                step = model.merge(step, newcomers.step)
            except Exception as exc:
                _fail([row.request for row in newcomers.rows], exc)  # not in the running batch: the caller misses them
                raise
            rows = rows + newcomers.rows
            self.metrics.joins.inc(len(newcomers.rows))
        self.metrics.decoding.set(len(rows))
        return Batch(step, rows)

    def _load(self) -> None:
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(self.cfg.serve.provider)
        if providers is None or "CUDAExecutionProvider" in providers:
            preload_cuda_libraries()
        started = time.perf_counter()
        self.preprocessor = Preprocessor(self.folder)
        self.variant = resolve_variant(self.cfg.serve.variant, self.folder, providers)
        self.model = load_runtime(self.folder, self.variant, self.cfg.serve, providers)  # slot (GQA) decoder when it derives
        self.preprocessor.pixel_dtype = self.model.pixel_dtype  # what the vision graph declares: no cast per request
        log.info("serve: loaded %s (%s) on %s in %.1f s", self.folder, self.variant, self.model.provider, time.perf_counter() - started)
        self.ready.set()

    def health(self) -> dict:
        if self.error:
            return {"status": "error", "error": self.error}
        if not self.ready.is_set():
            return {"status": "loading"}
        return {"status": "ok", "provider": self.model.provider, "variant": self.variant, "model": str(self.folder)}


def _fail(requests: list[GenRequest], exc: Exception) -> None:
    for request in requests:
        request.post("error", f"generation failed: {type(exc).__name__}: {exc}")


@dataclass
class Batch:
    """The rows being generated together and the decoder state whose logits are their next tokens."""

    step: Step
    rows: list[Row]


class Row:
    """A request's progress inside a batch: its tokens, the text already sent, and when to stop."""

    def __init__(self, request: GenRequest, preprocessor: Preprocessor):
        self.request, self.pre = request, preprocessor
        self.rng = np.random.default_rng(request.seed)
        self.text = IncrementalText(preprocessor)  # the completion's tokens and text, end-of-utterance excluded
        self.generated = 0  # every sampled token counts towards usage, end-of-utterance included
        self.sent = ""
        self.finished = False

    def add(self, token: int) -> None:
        r = self.request
        self.generated += 1
        if self.generated == 1:
            r.post("first_token")
        if token in self.pre.eos_token_ids:
            return self._finish("stop", self.text.final())
        before = len(self.text.text)
        text = self.text.add(token)
        for stop in r.stop:
            cut = text.find(stop, max(0, before - len(stop) + 1))  # earlier text was searched before
            if cut >= 0:
                return self._finish("stop", text[:cut])
        if len(self.text.tokens) >= r.max_tokens:
            return self._finish("length", self.text.final())
        # Hold back any tail that could still become a stop string (incomplete characters are held back already).
        safe = len(text)
        for stop in r.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        if safe > len(self.sent):
            r.post("token", text[len(self.sent):safe])
            self.sent = text[:safe]

    def _finish(self, reason: str, text: str) -> None:
        if len(text) > len(self.sent):
            self.request.post("token", text[len(self.sent):])
        self.sent = text
        self.finished = True
        self.request.post("done", reason, self.generated)


class IncrementalText:
    """The text of a growing token list, through tokenizers' DecodeStream: each token decodes a short window of
    recent tokens instead of the whole list (which cost milliseconds a step at 32 rows: docs/notes.md), and a
    token that ends in an incomplete UTF-8 character waits for the next. `final()` decodes all tokens at once."""

    def __init__(self, preprocessor: Preprocessor):
        self.pre = preprocessor
        self.tokens: list[int] = []
        self.text = ""
        self._stream = DecodeStream(skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        try:
            delta = self._stream.step(self.pre.tokenizer, token)
        except Exception:  # noqa: BLE001 - a window that no longer extends its prefix: decode it all, start afresh
            full = self.final()
            delta = full[len(self.text):] if full.startswith(self.text) and not full.endswith("\ufffd") else None
            self._stream = DecodeStream(ids=list(self.tokens), skip_special_tokens=True)
        if delta:
            self.text += delta
        return self.text

    def final(self) -> str:
        return self.pre.decode(self.tokens, skip_special_tokens=True)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / temperature), truncated to the top_p nucleus."""
    if temperature == 0.0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
        nucleus = np.zeros_like(probs)
        nucleus[keep] = probs[keep]
        probs = nucleus / nucleus.sum()
    return int(rng.choice(len(probs), p=probs))
