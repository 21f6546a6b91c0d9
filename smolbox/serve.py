"""Serve stage: an OpenAI-compatible chat server over the exported ONNX graphs. No torch anywhere on this path.

POST /v1/chat/completions   messages with text and image_url (data: URI) parts; stream=true gives server-sent events
GET  /v1/models             the one served model
GET  /health                200 once the ONNX sessions are loaded (503 before), with provider and variant
GET  /metrics               Prometheus text format

Requests go into a bounded queue; one engine thread takes up to serve.max_batch_size of them at a time, prefills
them as one left-padded batch and decodes them together with the KV cache kept on the device.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError

from . import access_log
from .config import Config

log = logging.getLogger("smolbox.serve")


# ---- errors -------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message that says what to change, type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- requests -----------------------------------------------------------------------------------------------


@dataclass
class GenRequest:
    """One parsed chat completion request, ready for the engine."""

    encoded: object  # preprocess.Encoded
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    events: "asyncio.Queue"  # the engine posts ("token", text_delta) / ("done", finish_reason, completion_tokens)
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def parse_request(body: dict, cfg, model_name: str) -> tuple[dict, list, list]:
    """Validate the OpenAI request body; returns (generation settings, chat messages for the template, images)."""
    s = cfg.serve
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'.", "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of message objects.", "messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "Only n=1 is supported.", "n")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = s.default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise APIError(400, "'max_tokens' must be a positive integer.", "max_tokens")
    if max_tokens > s.max_tokens_limit:
        raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {s.max_tokens_limit}.", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise APIError(400, "'top_p' must be greater than 0.", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise APIError(400, "'seed' must be an integer.", "seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "'stop' must be a string or an array of up to 4 non-empty strings.", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean.", "stream")

    chat, images = [], []
    for i, message in enumerate(messages):
        chat.append(_chat_message(message, i, images, cfg))
    if len(images) > s.max_images:
        raise APIError(400, f"The request has {len(images)} images; this server accepts at most {s.max_images} per request.", "messages")
    settings = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, stream=stream,
                    include_usage=isinstance(options := body.get("stream_options"), dict) and bool(options.get("include_usage")))
    return settings, chat, images


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number between {low} and {high}.", name)
    return float(value)


def _chat_message(message, index: int, images: list, cfg) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise APIError(400, f"{where} must be an object with role 'system', 'user' or 'assistant'.", where)
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list) or not content:
        raise APIError(400, f"{where}.content must be a string or a non-empty array of content parts.", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise APIError(400, f"{at}.image_url.url must be a string.", f"{at}.image_url")
            images.append(_load_image(url, at, cfg))
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"{at} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}.", at)
    return {"role": message["role"], "content": parts}


def _load_image(url: str, where: str, cfg) -> Image.Image:
    s = cfg.serve
    if url.startswith(("http://", "https://")):
        if not s.allow_remote_images:
            raise APIError(400, f"{where}: image URLs are not fetched by this server; send the image inline as a "
                                "data: URI (data:image/png;base64,...).", where, "remote_images_disabled")
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as response:  # only when an operator enabled it
            raw = response.read(s.max_body_bytes + 1)
    elif url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: only base64 data: URIs are supported (data:image/png;base64,...).", where)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data: URI is not valid base64.", where, "invalid_base64") from None
    else:
        raise APIError(400, f"{where}: the image URL must be a data: URI.", where)
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size  # from the header: decide before decoding the pixels
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, f"{where}: the bytes are not an image this server can read (PNG, JPEG, WebP, GIF, ...).", where, "invalid_image") from None
    if width * height > s.max_image_pixels or width == 0 or height == 0:
        raise APIError(400, f"{where}: the image is {width}x{height} = {width * height} pixels; at most {s.max_image_pixels} "
                            "are accepted: resize it.", where, "image_too_large")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, f"{where}: the image data is truncated or corrupt.", where, "invalid_image") from None
    return image.convert("RGB")


# ---- engine -------------------------------------------------------------------------------------------------


PREFILL_LOGITS_BUDGET = 2 * 2**30  # bytes of prefill logits one batch may produce; a lone request always runs


def resolve_variant(choice: str, folder: Path, providers: list[str] | None) -> str:
    """serve.variant=auto: q4 with fp16 activations on a GPU, q4 on the CPU (fp16 arithmetic is slow there),
    else the first variant the export has."""
    from .runtime import GRAPHS, VARIANT_SUFFIX, default_providers, graph_path

    if choice != "auto":
        return choice
    on_cuda = "CUDAExecutionProvider" in (providers or default_providers())
    available = [v for v in VARIANT_SUFFIX if all(graph_path(folder, g, v).is_file() for g in GRAPHS)]
    for preferred in (["q4f16", "q4"] if on_cuda else ["q4"]) + available:
        if preferred in available:
            return preferred
    raise FileNotFoundError(f"{folder / 'onnx'} holds no complete ONNX variant")


class QueueFull(Exception):
    pass


class Engine:
    """Owns the ONNX sessions; one thread batches waiting requests and generates for them together."""

    def __init__(self, cfg: Config, folder: Path, metrics: "Metrics"):
        self.cfg, self.folder, self.metrics = cfg, folder, metrics
        self.queue: queue.Queue[GenRequest] = queue.Queue()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error: str | None = None
        self.model = self.preprocessor = None
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
        active: _Batch | None = None
        while not self.stopping.is_set():
            if active is None:
                active = self._admit(block=True, room=self.cfg.serve.max_batch_size)
                continue
            try:
                active = self._advance(active)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the server down
                log.exception("serve: generation failed")
                _fail([row.request for row in active.rows if not row.finished], exc)
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
            if batch and not self._prefill_fits(batch, request):
                self.pending = request
                break
            batch.append(request)
        self.metrics.queue_depth.set(self.queue.qsize())
        return batch

    def _admit(self, block: bool, room: int) -> "_Batch | None":
        """Prefill waiting requests as a new batch (None when there are none, or their prefill failed)."""
        from .preprocess import pad_batch

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
        return _Batch(step, [_Row(r, np.random.default_rng(r.seed)) for r in requests])

    def _advance(self, batch: "_Batch") -> "_Batch | None":
        """One token for every row (continuous batching): sample from the current logits, let finished rows
        leave, decode one step, and let waiting requests join the running batch once they are prefilled."""
        model, pre = self.model, self.preprocessor
        tokens = batch.step.logits.argmax(-1).astype(np.int64)  # greedy rows: one call for the batch
        for i, row in enumerate(batch.rows):
            if row.request.temperature != 0.0:
                tokens[i] = _sample(batch.step.logits[i], row.request.temperature, row.request.top_p, row.rng)
            row.add(int(tokens[i]), pre)
        keep = [i for i, row in enumerate(batch.rows) if not row.finished]
        if not keep:
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
        return _Batch(step, rows)

    def _prefill_fits(self, batch: list[GenRequest], request: GenRequest) -> bool:
        """Whether `request` may join `batch`: a traced decoder returns fp32 logits for every prompt position,
        rows x longest prompt x vocabulary. On a GPU, 32 prompts of 1,107 tokens (7 GB of logits) crashed
        onnxruntime's CUDA provider and the server with it (docs/benchmarks.md). The fused decoder returns the
        last position only."""
        longest = max([r.prompt_tokens for r in batch] + [request.prompt_tokens]) if self.model.logits_all_positions else 1
        return (len(batch) + 1) * longest * self.model.vocab_size * 4 <= PREFILL_LOGITS_BUDGET

    def _load(self) -> None:
        from .preprocess import Preprocessor
        from .runtime import OnnxVLM

        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(self.cfg.serve.provider)
        if providers is None or "CUDAExecutionProvider" in providers:
            _preload_cuda_libraries()
        started = time.perf_counter()
        self.preprocessor = Preprocessor(self.folder)
        self.variant = resolve_variant(self.cfg.serve.variant, self.folder, providers)
        self.model = OnnxVLM(self.folder, self.variant, providers=providers, session_config=self.cfg.serve.ort_session_config)
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
class _Batch:
    """The rows being generated together and the decoder state whose logits are their next tokens."""

    step: object  # runtime.Step
    rows: list["_Row"]


class _Row:
    """A request's progress inside a batch: its tokens, the text already sent, and when to stop."""

    def __init__(self, request: GenRequest, rng: np.random.Generator):
        self.request, self.rng = request, rng
        self.text = _IncrementalText()  # the completion's tokens and text, end-of-utterance excluded
        self.generated = 0  # every sampled token counts towards usage, end-of-utterance included
        self.sent = ""
        self.finished = False

    def add(self, token: int, pre) -> None:
        r = self.request
        self.generated += 1
        if self.generated == 1:
            r.post("first_token")
        if token in pre.eos_token_ids:
            return self._finish("stop", self.text.final(pre))
        before = len(self.text.text)
        text = self.text.add(token, pre)
        for stop in r.stop:
            cut = text.find(stop, max(0, before - len(stop) + 1))  # earlier text was searched before
            if cut >= 0:
                return self._finish("stop", text[:cut])
        if len(self.text.tokens) >= r.max_tokens:
            return self._finish("length", self.text.final(pre))
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


class _IncrementalText:
    """The text of a growing token list without decoding the whole list at every token (at 32 rows of 256 tokens
    that alone cost ~2 ms a step on a 2-core host). Each token decodes a short window that starts a few tokens back,
    so merges and leading-space rules see their context, and keeps what the new token added; a token that ends in
    an incomplete UTF-8 character waits for the next. `final()` equals decoding all tokens at once."""

    def __init__(self):
        self.tokens: list[int] = []
        self.text = ""
        self._start = 0  # window start: tokens before it are in self.text for good
        self._done = 0  # tokens up to here are in self.text

    def _delta(self, pre) -> str:
        known = pre.decode(self.tokens[self._start:self._done], skip_special_tokens=True)
        window = pre.decode(self.tokens[self._start:], skip_special_tokens=True)
        if window.startswith(known):
            return window[len(known):]
        full = pre.decode(self.tokens, skip_special_tokens=True)  # windows that do not line up: decode it all
        return full[len(self.text):] if full.startswith(self.text) else ""

    def add(self, token: int, pre) -> str:
        self.tokens.append(token)
        delta = self._delta(pre)
        if delta and not delta.endswith("\ufffd"):
            self.text += delta
            self._start, self._done = self._done, len(self.tokens)
        return self.text

    def final(self, pre) -> str:
        return pre.decode(self.tokens, skip_special_tokens=True)


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
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


def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu from PyPI finds the CUDA/cuDNN libraries of the nvidia-* wheels only after this call.
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - CPU fallback below is reported on /health
            log.warning("serve: could not preload CUDA libraries: %s", exc)


# ---- metrics ------------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("smolbox_requests_total", "Chat completion requests by HTTP status", ["status"], registry=self.registry)
        self.errors = Counter("smolbox_request_errors_total", "Failed requests by error code", ["code"], registry=self.registry)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("smolbox_request_latency_seconds", "Time from request to last token", buckets=buckets, registry=self.registry)
        self.ttft = Histogram("smolbox_time_to_first_token_seconds", "Time from request to first token", buckets=buckets, registry=self.registry)
        self.tokens = Counter("smolbox_generated_tokens_total", "Completion tokens generated", registry=self.registry)
        self.queue_depth = Gauge("smolbox_queue_depth", "Requests waiting for the engine", registry=self.registry)
        self.batch_size = Histogram("smolbox_batch_size", "Requests per prefill batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.joins = Counter("smolbox_batch_joins_total", "Prefilled requests that joined a batch already decoding", registry=self.registry)
        self.decoding = Gauge("smolbox_decoding_rows", "Requests in the decoding batch", registry=self.registry)


# ---- HTTP ---------------------------------------------------------------------------------------------------


def build_app(cfg: Config) -> FastAPI:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    folder = export_folder(cfg)
    model_name = cfg.serve.model_name or folder.name
    metrics = Metrics()
    engine = Engine(cfg, folder, metrics)
    created = int(time.time())

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="smolbox", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(access_log.AccessLog)
    expected_auth = f"Bearer {cfg.serve.api_key}".encode()

    def error_response(err: APIError) -> JSONResponse:
        metrics.requests.labels(str(err.status)).inc()
        metrics.errors.labels(err.code or err.kind).inc()
        # RFC 6750: a 401 names the scheme the client should use.
        return JSONResponse(err.body(), status_code=err.status, headers={"WWW-Authenticate": "Bearer"} if err.status == 401 else None)

    def authorized(request: Request) -> bool:
        # Constant time: how long the comparison takes must not tell an attacker how much of a guess was right.
        return not cfg.serve.api_key or hmac.compare_digest(request.headers.get("authorization", "").encode(), expected_auth)

    @app.get("/health")
    async def health():
        state = engine.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return error_response(APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'.", code="invalid_api_key"))
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "smolbox"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        try:
            if not authorized(request):
                raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
            if not engine.ready.is_set():
                raise APIError(503, "The model is still loading; retry shortly.", code="model_loading", kind="server_error")
            body = await _read_body(request, cfg.serve.max_body_bytes)
            # Image decoding, tiling and tokenization take tens of ms of CPU: off the event loop, so streams keep flowing.
            settings, encoded = await asyncio.to_thread(_prepare, body, cfg, model_name, engine.preprocessor)
            prompt_tokens = int(encoded.input_ids.shape[1])
            access_log.usage(request.scope)["prompt_tokens"] = prompt_tokens
            if prompt_tokens > cfg.serve.max_prompt_tokens:
                raise APIError(400, f"The prompt is {prompt_tokens} tokens (images included); this server accepts at most "
                                    f"{cfg.serve.max_prompt_tokens}: shorten the text or send fewer/smaller images.", "messages", "context_length_exceeded")
            loop = asyncio.get_running_loop()
            job = GenRequest(encoded, prompt_tokens, settings["max_tokens"], settings["temperature"], settings["top_p"],
                             settings["seed"], settings["stop"], asyncio.Queue(), loop, started)
            try:
                engine.submit(job)
            except QueueFull:
                raise APIError(429, f"The server is at capacity ({cfg.serve.max_queue} requests waiting); retry later.",
                               code="queue_full", kind="rate_limit_error") from None
        except APIError as err:
            return error_response(err)

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        stamp = int(time.time())
        if settings["stream"]:
            return StreamingResponse(_stream(job, completion_id, stamp, model_name, settings["include_usage"], metrics,
                                             access_log.usage(request.scope)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces, reason, completion_tokens = [], "stop", 0
        async for event in _events(job, metrics):
            if event[0] == "token":
                pieces.append(event[1])
            elif event[0] == "done":
                reason, completion_tokens = event[1], event[2]
                access_log.usage(request.scope)["completion_tokens"] = completion_tokens
            elif event[0] == "error":
                return error_response(APIError(500, event[1], code="generation_failed", kind="server_error"))
        metrics.requests.labels("200").inc()
        return {
            "id": completion_id, "object": "chat.completion", "created": stamp, "model": model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                         "logprobs": None, "finish_reason": reason}],
            "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": job.prompt_tokens + completion_tokens},
        }

    return app


def _prepare(body, cfg: Config, model_name: str, preprocessor) -> tuple[dict, object]:
    """Validate the request and turn it into model inputs (runs in a worker thread)."""
    settings, chat, images = parse_request(body, cfg, model_name)
    text = preprocessor.render_chat(chat, add_generation_prompt=True)
    return settings, preprocessor.encode(text, images)


async def _read_body(request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {declared} bytes; at most {limit} are accepted.", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is over {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None


async def _events(job: GenRequest, metrics: Metrics):
    """The engine's events for one request, with latency metrics taken on the way."""
    while True:
        event = await job.events.get()
        if event[0] == "first_token":
            metrics.ttft.observe(time.perf_counter() - job.submitted)
            continue
        if event[0] == "done":
            metrics.latency.observe(time.perf_counter() - job.submitted)
            metrics.tokens.inc(event[2])
        yield event
        if event[0] in ("done", "error"):
            return


async def _stream(job: GenRequest, completion_id: str, stamp: int, model_name: str, include_usage: bool, metrics: Metrics,
                  logged: dict):
    def chunk(delta: dict, reason=None, usage=None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                "system_fingerprint": None, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for event in _events(job, metrics):
        if event[0] == "token":
            yield chunk({"content": event[1]})
        elif event[0] == "done":
            logged["completion_tokens"] = event[2]
            yield chunk({}, event[1])
            if include_usage:
                usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": event[2], "total_tokens": job.prompt_tokens + event[2]}
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                        "system_fingerprint": None, "choices": [], "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
        elif event[0] == "error":
            yield f"data: {json.dumps(APIError(500, event[1], code='generation_failed', kind='server_error').body())}\n\n"
    metrics.requests.labels("200").inc()
    yield "data: [DONE]\n\n"


def export_folder(cfg: Config) -> Path:
    folder = Path(cfg.serve.model) if cfg.serve.model else cfg.export_dir()
    if not (folder / "onnx").is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (no onnx/ or config.json): run `smolbox export` or set serve.model")
    return folder


def serve(cfg: Config) -> None:
    """Run the server until SIGTERM/SIGINT; in-flight requests get serve.drain_timeout_s to finish."""
    import uvicorn

    app = build_app(cfg)
    json_lines = cfg.serve.log_format == "json"
    if json_lines:
        access_log.use_json_lines()
    log.info("serve: http://%s:%d  model %s  variant %s", cfg.serve.host, cfg.serve.port, export_folder(cfg), cfg.serve.variant)
    # uvicorn's own access log is off: smolbox.access_log writes one line per request, with tokens and request id.
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=cfg.serve.drain_timeout_s, **({"log_config": None} if json_lines else {}))


def demo_request(cfg: Config, image: Image.Image, question: str) -> str:
    """Start the server on a free loopback port, ask one image question over HTTP, shut the server down; the answer."""
    import socket
    import urllib.request

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"host": "127.0.0.1", "port": port, "api_key": None})})
    server = uvicorn.Server(uvicorn.Config(build_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}},
            {"type": "text", "text": question}]}], "temperature": 0, "max_tokens": 16}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
