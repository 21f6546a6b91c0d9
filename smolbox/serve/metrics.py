"""The server's Prometheus metrics (GET /metrics): requests and errors, latency and time to first token, tokens,
queue depth, batch sizes and joins. One registry per app, so two servers in one process never share counts."""

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
        self.queue_depth = Gauge("smolbox_queue_depth", "Requests waiting for the engine", registry=registry)
        self.batch_size = Histogram("smolbox_batch_size", "Requests per prefill batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.joins = Counter("smolbox_batch_joins_total", "Prefilled requests that joined a batch already decoding", registry=registry)
        self.decoding = Gauge("smolbox_decoding_rows", "Requests in the decoding batch", registry=registry)
