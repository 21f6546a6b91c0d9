"""The serving engine: one thread owns the ONNX sessions and generates for every waiting request together.

Requests wait in a bounded queue (smolbox.serve.scheduler). The engine runs in steps: each samples a token for every
running row, lets finished rows leave, decodes one step for the others, and then prefills the newcomers the
scheduler picks as one left-padded batch that joins the running one (continuous batching), the KV cache kept on the
device. Newcomers come within a prompt-token budget per step, so running rows get a decode step between them, and
within the KV capacity; their images go through the vision encoder in one call, repeated images not at all (image
cache). A row turns its tokens into streamed text and decides when it is done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers.decoders import DecodeStream

from ..config import Config
from ..onnx_layout import available_variants, graph_path
from ..preprocess import Encoded, Preprocessor, pad_batch, stack_tiles
from ..runtime import OnnxVLM, Step, default_providers
from .kv_decoder import load_runtime
from .metrics import Metrics
from .prepare import tiling_preprocessor
from .scheduler import LRUCache, Scheduler, prompt_key

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
    images: list[tuple[bytes, np.ndarray]] = field(default_factory=list)  # (key, tiles) per image: scheduler.image_parts
    prompt_key: bytes | None = None  # scheduler.prompt_key, made on first use
    queued: float = 0.0  # when the engine's queue took it (perf_counter)

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Outbox:
    """Events of the rows of an engine step, handed to their event loop together once every row has its token: one
    wake-up of the loop a step instead of one a token (each call_soon_threadsafe takes the loop's lock and writes to its
    wake-up pipe, and each wake-up runs on the loop's thread, which holds the GIL the engine thread needs)."""

    def __init__(self):
        self.pending: dict[asyncio.AbstractEventLoop, list] = {}

    def post(self, request: GenRequest, *event) -> None:
        self.pending.setdefault(request.loop, []).append((request.events, event))

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for loop, items in pending.items():
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


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
    prompt position, rows x longest prompt x vocabulary, and on a GPU a batch of full-size image prompts (gigabytes
    of logits) crashed onnxruntime's CUDA provider and the server with it (docs/benchmarks.md, H200 2026-11-27,
    "Serving"); the fused decoder returns the last position only. A lone request always runs."""
    longest = max(prompt_tokens) if logits_all_positions else 1
    return len(prompt_tokens) == 1 or len(prompt_tokens) * longest * vocab_size * 4 <= PREFILL_LOGITS_BUDGET


class Engine:
    """Owns the ONNX sessions; one thread runs steps: a decode step for the running rows, then the prefill of the
    newcomers the scheduler picks (smolbox.serve.scheduler), their images through the vision encoder together."""

    def __init__(self, cfg: Config, folder: Path, metrics: Metrics):
        self.cfg, self.folder, self.metrics = cfg, folder, metrics
        self.scheduler = Scheduler(cfg.serve)
        self.outbox = Outbox()
        self.phase_seconds = {p: metrics.engine_seconds.labels(p) for p in ("rows", "decode", "reuse", "vision", "prefill", "merge")}
        self.image_cache = LRUCache(int(cfg.serve.image_cache_mb * 2**20))
        self.identity = b""  # the export's identity in image keys (set when the sessions load)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error: str | None = None
        self.model: OnnxVLM | None = None
        self.preprocessor: Preprocessor | None = None
        self.thread = threading.Thread(target=self._main, name="smolbox-engine", daemon=True)
        # serve.overlap_rows: the rows take a step's tokens on this thread while the engine thread runs the decode step
        self.rows_thread = ThreadPoolExecutor(1, thread_name_prefix="smolbox-rows") if cfg.serve.overlap_rows else None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        if self.rows_thread is not None:
            self.rows_thread.shutdown(wait=False)

    def submit(self, request: GenRequest) -> None:
        request.queued = time.perf_counter()
        self.scheduler.submit(request)
        self.metrics.queue_depth.set(self.scheduler.waiting())

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
                # Nothing runs: wait for a first request, then up to serve.batch_wait_ms for the batch to fill.
                if not self.scheduler.wait(1, timeout=0.1):
                    continue
                self.scheduler.wait(self.cfg.serve.max_batch_size, timeout=self.cfg.serve.batch_wait_ms / 1000)
            try:
                active = self._step(active)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the server down
                log.exception("serve: generation failed")
                rows = active.rows if active is not None else []
                _fail([row.request for row in rows if not row.finished], exc)
                for row in rows:
                    self.scheduler.release(row.request)
                self.model.release_all()  # nothing runs now: every KV slot is free again
                active = None
            self.metrics.kv_tokens.set(self.scheduler.kv_in_use)

    def _step(self, batch: Batch | None) -> Batch | None:
        """One engine step (continuous batching): sample a token for every running row from the current logits, let
        finished rows leave, decode one step for the others, then prefill this step's newcomers and let them join.
        The rows' events go out together (Outbox) as soon as every row has its token, before the decode step ends
        (serve.overlap_rows: while it runs) and before the newcomers' prefill, so a token does not wait for them;
        anything posted later in the step (a failed prefill's errors) goes at its end, also when the step fails."""
        try:
            return self._run_step(batch)
        finally:
            self.outbox.flush()

    def _run_step(self, batch: Batch | None) -> Batch | None:
        model, step, rows, clock = self.model, None, [], _PhaseClock(self.phase_seconds)
        if batch is not None:
            tokens = batch.step.greedy.copy()  # greedy rows (on the GPU argmaxed there: no logits copied)
            for i, row in enumerate(batch.rows):
                if row.request.temperature != 0.0:
                    tokens[i] = sample(batch.step.logits[i], row.request.temperature, row.request.top_p, row.rng)
            if self.rows_thread is not None:
                step, rows = self._decode_beside_rows(batch, tokens, clock)
            else:
                self._add_tokens(batch.rows, tokens)
                clock.lap("rows")
                keep = self._finished_leave(batch.rows)
                if not keep:
                    model.release(batch.step)  # every row finished: their KV slots are free for this step's newcomers
                else:
                    step = batch.step if len(keep) == len(batch.rows) else model.select(batch.step, keep)
                    rows = [batch.rows[i] for i in keep]
                    step = model.decode(step, tokens[keep])
                    self.metrics.decode_steps.inc()
                    self.metrics.decode_rows.inc(len(rows))
                clock.lap("decode")
        if not rows or self.cfg.serve.continuous_batching:
            newcomers = self._admit(running=len(rows), clock=clock)
            if newcomers is not None and step is None:
                step, rows = newcomers.step, newcomers.rows
            elif newcomers is not None:
                try:
                    step = model.merge(step, newcomers.step)
                except Exception as exc:
                    self._drop(newcomers.rows, exc)  # not in the running batch: the caller misses them
                    raise
                rows = rows + newcomers.rows
                self.metrics.joins.inc(len(newcomers.rows))
                clock.lap("merge")
        self.metrics.decoding.set(len(rows))
        return Batch(step, rows) if rows else None

    def _add_tokens(self, rows: list[Row], tokens: np.ndarray) -> None:
        """Each row takes its token (text, stop checks, events); the events go to the event loop together."""
        for row, token in zip(rows, tokens):
            row.add(int(token))
        self.outbox.flush()

    def _finished_leave(self, rows: list[Row]) -> list[int]:
        """The scheduler releases the rows that finished (on the engine thread, as its other calls); the indices
        of those that go on."""
        for row in rows:
            if row.finished:
                self.scheduler.release(row.request)
        return [i for i, row in enumerate(rows) if not row.finished]

    def _decode_beside_rows(self, batch: Batch, tokens: np.ndarray, clock: _PhaseClock) -> tuple[object, list[Row]]:
        """serve.overlap_rows: the decode step runs for every row of `batch` while the rows take their tokens on
        the rows thread (onnxruntime releases the GIL while it runs), so the rows' host work no longer waits
        between steps; rows that finished with this token then leave the new step, their one extra token unused
        (a row's KV slot holds prompt + max_tokens, so it has room for it). Returns (step, rows) that go on."""
        model = self.model
        adding = self.rows_thread.submit(self._add_tokens, batch.rows, tokens)
        try:
            step = model.decode(batch.step, tokens)
        finally:
            adding.result()
        self.metrics.decode_steps.inc()
        self.metrics.decode_rows.inc(len(batch.rows))
        keep = self._finished_leave(batch.rows)
        if not keep:
            model.release(step)
            step = None
        elif len(keep) < len(batch.rows):
            step = model.select(step, keep)
        clock.lap("decode")
        return step, [batch.rows[i] for i in keep]

    def _admit(self, running: int, clock: _PhaseClock) -> Batch | None:
        """This step's newcomers as one batch (None when there are none, or they failed): those whose prompt the
        prompt cache holds copied into their slots (SlotVLM.reuse), the others prefilled as one left-padded batch
        and, with the prompt cache on, kept in it."""
        model = self.model
        cache = getattr(model, "prompt_cache", None)  # SlotVLM's; the published decoder's runtime has none
        cache = cache if cache is not None and cache.max_bytes > 0 else None
        cached = (lambda r: prompt_key(r) in cache) if cache is not None else (lambda r: False)
        requests = self.scheduler.take(running, lambda lengths: prefill_fits(lengths, model.vocab_size, model.logits_all_positions),
                                       prefill_tokens=lambda r: 0 if cached(r) else r.prompt_tokens)
        self.metrics.queue_depth.set(self.scheduler.waiting())
        if not requests:
            return None
        self.metrics.batch_size.observe(len(requests))
        now = time.perf_counter()
        for r in requests:
            self.metrics.queue_wait.observe(now - r.queued)
        hits = [r for r in requests if cached(r)]
        misses = [r for r in requests if not cached(r)]
        rows = [Row(r, self.preprocessor, self.outbox) for r in hits + misses]
        reused = None
        try:
            clock.lap("rows")
            if hits:
                reused = model.reuse([prompt_key(r) for r in hits])
                self.metrics.prompt_cache_hits.inc(len(hits))
                clock.lap("reuse")
            if not misses:
                return Batch(reused, rows)
            features = self._image_features(misses)
            clock.lap("vision")
            inputs = pad_batch([Encoded(r.encoded.input_ids, r.encoded.attention_mask, None, None) for r in misses],
                               self.preprocessor.pad_token_id)
            step = model.prefill(inputs["input_ids"], inputs["attention_mask"], image_features=features)
            if cache is not None:
                self.metrics.prompt_cache_misses.inc(len(misses))
                try:
                    model.remember([prompt_key(r) for r in misses], step)
                except Exception:  # noqa: BLE001 - the cache only saves time: these requests go on without it
                    log.exception("serve: keeping prompts in the prompt cache failed")
                self.metrics.prompt_cache_bytes.set(cache.bytes)
            clock.lap("prefill")
        except Exception as exc:  # noqa: BLE001 - these requests fail, the running batch goes on
            log.exception("serve: prefill failed")
            if reused is not None:
                model.release(reused)
            self._drop(rows, exc)
            return None
        return Batch(step if reused is None else model.merge(reused, step), rows)

    def _image_features(self, requests: list[GenRequest]) -> np.ndarray | None:
        """The image features of these prompts, in order [tiles, tokens, hidden]: cached ones from the image cache,
        the others from one vision-encoder call over all their tiles."""
        parts = [part for r in requests for part in r.images]
        if not parts:
            return None
        found: dict[bytes, np.ndarray] = {}
        missing: dict[bytes, np.ndarray] = {}
        for key, tiles in parts:
            if key in found or key in missing:
                continue
            cached = self.image_cache.get(key)
            if cached is not None:
                found[key] = cached
            else:
                missing[key] = tiles
        self.metrics.image_cache_hits.inc(len(parts) - len(missing))
        self.metrics.image_cache_misses.inc(len(missing))
        if missing:
            features = self.model.vision_features(*stack_tiles(list(missing.values())))
            self.metrics.vision_calls.inc()
            start = 0
            for key, tiles in missing.items():
                found[key] = features[start:start + tiles.shape[0]].copy()
                self.image_cache.put(key, found[key])
                start += tiles.shape[0]
            self.metrics.image_cache_bytes.set(self.image_cache.bytes)
        return np.concatenate([found[key] for key, _ in parts])

    def _drop(self, rows: list[Row], exc: Exception) -> None:
        _fail([row.request for row in rows], exc)
        for row in rows:
            self.scheduler.release(row.request)

    def _load(self) -> None:
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(self.cfg.serve.provider)
        if providers is None or "CUDAExecutionProvider" in providers:
            preload_cuda_libraries()
        started = time.perf_counter()
        self.preprocessor = tiling_preprocessor(self.folder, self.cfg.serve)
        self.variant = resolve_variant(self.cfg.serve.variant, self.folder, providers)
        self.model = load_runtime(self.folder, self.variant, self.cfg.serve, providers)  # slot (GQA) decoder when it derives
        self.preprocessor.pixel_dtype = self.model.pixel_dtype  # what the vision graph declares: no cast per request
        vision = graph_path(self.folder, "vision_encoder", self.variant).stat()
        self.identity = f"{self.folder.resolve()}|{self.variant}|{vision.st_size}|{vision.st_mtime_ns}".encode()
        log.info("serve: loaded %s (%s) on %s in %.1f s", self.folder, self.variant, self.model.provider, time.perf_counter() - started)
        self.ready.set()

    def health(self) -> dict:
        if self.error:
            return {"status": "error", "error": self.error}
        if not self.ready.is_set():
            return {"status": "loading"}
        return {"status": "ok", "provider": self.model.provider, "variant": self.variant, "model": str(self.folder)}


class _PhaseClock:
    """Adds the time since the last lap to a phase's counter (smolbox_engine_seconds_total); `counters` maps each
    phase to its labelled child, looked up once (labels() takes a lock and builds a key on every call)."""

    def __init__(self, counters: dict):
        self.counters, self.last = counters, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.counters[phase].inc(now - self.last)
        self.last = now


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

    def __init__(self, request: GenRequest, preprocessor: Preprocessor, outbox: Outbox | None = None):
        self.request, self.pre = request, preprocessor
        # Events through the engine's outbox (delivered when its step ends), or straight to the request's loop.
        self._post = (lambda *event: outbox.post(request, *event)) if outbox is not None else request.post
        self.rng = np.random.default_rng(request.seed)
        self.text = IncrementalText(preprocessor)  # the completion's tokens and text, end-of-utterance excluded
        self.generated = 0  # every sampled token counts towards usage, end-of-utterance included
        self.sent = ""
        self.finished = False

    def add(self, token: int) -> None:
        r = self.request
        self.generated += 1
        if self.generated == 1:
            self._post("first_token")
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
            self._post("token", text[len(self.sent):safe])
            self.sent = text[:safe]

    def _finish(self, reason: str, text: str) -> None:
        if len(text) > len(self.sent):
            self._post("token", text[len(self.sent):])
        self.sent = text
        self.finished = True
        self._post("done", reason, self.generated)


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
