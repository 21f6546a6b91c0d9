"""The server's request log and request ids: one ASGI middleware around the app, and the text of its lines.

Every response carries `X-Request-ID`: the client's own when it sends a well-formed one (so a gateway's id runs
through), else a new one. After each request one record goes to the `smolbox.serve.access` logger: method, path
(without the query string), status, latency and, for chat completions, prompt and completion tokens. Never the
prompt, the answer or an image. Probes (/health, /metrics) are logged at debug level, so they do not flood the log.
With `serve.log_format: json` every line the server prints is one JSON object (smolbox.logs.use_json_lines), each
request's record with these fields.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

log = logging.getLogger("smolbox.serve.access")

HEADER = "x-request-id"
# What a client may choose as its id: printable, no spaces or quotes, so it cannot forge or break a log line.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_PROBES = {"/health", "/metrics"}
_SCOPE_KEY = "smolbox.access"


def usage(scope: dict) -> dict:
    """The record the handler fills in for the log (prompt_tokens, completion_tokens); a fresh dict without the middleware."""
    return scope.get(_SCOPE_KEY, {})


class AccessLog:
    """ASGI middleware: sets and echoes the request id, and logs one record per HTTP request when it has finished
    (for a stream: when its last event was sent or the client went away)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = dict(scope.get("headers") or []).get(HEADER.encode(), b"").decode("latin-1")
        request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        record = scope[_SCOPE_KEY] = {}
        status = 500  # unless a response starts

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields = {"request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                      "latency_ms": round((time.perf_counter() - started) * 1000, 1), **record}
            log.log(logging.DEBUG if scope["path"] in _PROBES else logging.INFO, "%s", _text(fields), extra={"fields": fields})


def _text(f: dict) -> str:
    tokens = f" {f['prompt_tokens']}+{f.get('completion_tokens', 0)} tokens" if "prompt_tokens" in f else ""
    return f"{f['method']} {f['path']} {f['status']} {f['latency_ms']} ms{tokens} id {f['request_id']}"
