"""`smolbox demo`'s client: start the server on a free loopback port, ask one image question over HTTP, stop it."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.request

from PIL import Image

from ..config import Config
from .app import build_app


def demo_request(cfg: Config, image: Image.Image, question: str) -> str:
    """The served model's answer to one image question, greedy, at most 16 tokens."""
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
