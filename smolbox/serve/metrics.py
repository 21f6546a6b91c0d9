"""The server's Prometheus metrics (GET /metrics): requests and errors, latency and time to first token, tokens,
preprocessing time (and its body reading and preparation work), queue wait and depth, batch sizes and joins, reserved KV tokens, vision-encoder calls, image- and prompt-cache hits and misses, and the
engine thread's time by phase (what a step's wall time goes to under load). One registry per app, so two servers in
one process never share counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("smolbox_requests_total", "Chat completion requests by HTTP status", ["status"], registry=registry)
        self.errors = Counter("smolbox_request_errors_total", "Failed requests by error code", ["code"], registry=registry)
        self.latency = Histogram("smolbox_request_latency_seconds", "Time from request to last token", buckets=BUCKETS, registry=registry)
        self.ttft = Histogram("smolbox_time_to_first_token_seconds", "Time from request to first token", buckets=BUCKETS, registry=registry)
        self.tokens = Counter("smolbox_generated_tokens_total", "Completion tokens generated", registry=registry)
        self.preprocess = Histogram("smolbox_preprocess_seconds", "Time from the request to the engine's queue: validation, images, tokens", buckets=BUCKETS, registry=registry)
        self.body_read = Histogram("smolbox_body_read_seconds", "Of smolbox_preprocess_seconds: reading the request body", buckets=BUCKETS, registry=registry)
        self.prepare_work = Histogram("smolbox_prepare_work_seconds", "Of smolbox_preprocess_seconds: the preparation itself (validation, chat "
                                      "template, images, tokens) in its thread or worker process; the rest is waiting for one and for the "
                                      "event loop to take the result", buckets=BUCKETS, registry=registry)
        self.queue_wait = Histogram("smolbox_queue_wait_seconds", "Time from the engine's queue to the step that admits the request", buckets=BUCKETS, registry=registry)
        self.queue_depth = Gauge("smolbox_queue_depth", "Requests waiting for the engine", registry=registry)
        self.batch_size = Histogram("smolbox_batch_size", "Requests per prefill batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.joins = Counter("smolbox_batch_joins_total", "Prefilled requests that joined a batch already decoding", registry=registry)
        self.decoding = Gauge("smolbox_decoding_rows", "Requests in the decoding batch", registry=registry)
        self.kv_tokens = Gauge("smolbox_kv_tokens_reserved", "Prompt + max_tokens of the requests in flight (of serve.max_kv_tokens)", registry=registry)
        self.vision_calls = Counter("smolbox_vision_encoder_calls_total", "Vision encoder runs (one per prefill batch with uncached images)", registry=registry)
        self.image_cache_hits = Counter("smolbox_image_cache_hits_total", "Images whose vision features came from the image cache", registry=registry)
        self.image_cache_misses = Counter("smolbox_image_cache_misses_total", "Images that went through the vision encoder", registry=registry)
        self.engine_seconds = Counter("smolbox_engine_seconds_total", "Engine thread time by phase: rows (sampling, text and "
                                      "events of the running rows), decode (decode steps), reuse (cached prompts copied "
                                      "into slots), vision (vision encoder), prefill (newcomers' decoder prefill, their "
                                      "prompts kept in the prompt cache), merge (newcomers joining the running batch)",
                                      ["phase"], registry=registry)
        self.decode_steps = Counter("smolbox_decode_steps_total", "Decode steps run", registry=registry)
        self.decode_rows = Counter("smolbox_decode_rows_total", "Rows decoded, summed over decode steps", registry=registry)
        self.prompt_cache_hits = Counter("smolbox_prompt_cache_hits_total", "Newcomers whose prompt's KV came from the prompt cache (no prefill)", registry=registry)
        self.prompt_cache_misses = Counter("smolbox_prompt_cache_misses_total", "Newcomers prefilled (prompt cache on, prompt not in it)", registry=registry)
        self.prompt_cache_bytes = Gauge("smolbox_prompt_cache_bytes", "Bytes of prompts' KV in the prompt cache", registry=registry)
        self.image_cache_bytes = Gauge("smolbox_image_cache_bytes", "Bytes of vision features in the image cache", registry=registry)
