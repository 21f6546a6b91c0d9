"""Serve stage: an OpenAI-compatible chat server over an export's ONNX graphs. No torch anywhere on this path (the
serving image has none; tests/serve/test_app.py keeps it so).

  api.py         the request: typed models, the server's limits, OpenAI-style errors
  prepare.py     a request body to model inputs (validation, template, image tiles, tokens), in threads or worker
                 processes (serve.preprocess_workers)
  engine.py      the engine: one thread, continuous batching in steps, rows that stream text and know when to stop
  scheduler.py   who starts in each step (batch room, prefill-token budget, KV capacity); the image cache
  metrics.py     Prometheus metrics
  access_log.py  request ids and one log record per request
  app.py         the FastAPI app: routes, one error handler, one API-key dependency; `serve()`
  client.py      `smolbox demo`'s one question over HTTP
"""

from .app import build_app, export_folder, serve
from .client import demo_request

__all__ = ["build_app", "demo_request", "export_folder", "serve"]
