#!/usr/bin/env python3
"""Compare two smolbox servers (loopback only): the containerised one and an in-process reference.

    ci_chat_check.py wait URL [--timeout S]        until GET URL/health answers 200
    ci_chat_check.py compare URL_A URL_B [--api-key K]

`compare` checks /health on both, that a request without the key is refused (401) when a key is given, then sends
the same greedy chat request (temperature 0, one PNG image as a data: URI) to both and requires the same answer:
content, finish_reason, usage and model. Stdlib only; proxies are bypassed. Exit code 0 on success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def loopback_only(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"ci_chat_check: refusing non-loopback URL {url}")
    return url.rstrip("/")


def png(width: int = 48, height: int = 40) -> bytes:
    """A deterministic RGB gradient as a PNG, written with zlib alone."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in ((x * 5) % 256, (y * 6) % 256, ((x + y) * 3) % 256))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def call(url: str, path: str, body: dict | None = None, api_key: str | None = None, timeout: float = 120) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")}


def wait(url: str, timeout: float) -> int:
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        try:
            status, body = call(url, "/health", timeout=5)
            if status == 200:
                print(f"ci_chat_check: {url}/health 200 {json.dumps(body)}")
                return 0
            last = f"{status} {body}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    print(f"ci_chat_check: {url}/health not 200 within {timeout:g} s: {last}", file=sys.stderr)
    return 1


def compare(url_a: str, url_b: str, api_key: str | None) -> int:
    failures = []
    for url in (url_a, url_b):
        status, body = call(url, "/health")
        if status != 200 or body.get("status") != "ok":
            failures.append(f"{url}/health: {status} {body}")
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    request = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "Describe this image in one sentence."},
        ]}],
        "temperature": 0,
        "max_tokens": 24,
    }
    if api_key:
        status, body = call(url_a, "/v1/chat/completions", request)
        if status != 401:
            failures.append(f"{url_a}: a request without the API key got {status}, not 401")
    answers = []
    for url in (url_a, url_b):
        status, body = call(url, "/v1/chat/completions", request, api_key)
        if status != 200:
            failures.append(f"{url}/v1/chat/completions: {status} {body}")
            continue
        choice = body["choices"][0]
        answers.append({"content": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                        "usage": body.get("usage"), "model": body.get("model")})
    if len(answers) == 2:
        print(f"ci_chat_check: {url_a}: {json.dumps(answers[0])}")
        print(f"ci_chat_check: {url_b}: {json.dumps(answers[1])}")
        if answers[0] != answers[1]:
            failures.append("the two servers answered differently")
        elif not answers[0]["usage"] or not answers[0]["usage"].get("completion_tokens"):
            failures.append("the answer has no completion tokens")
    for failure in failures:
        print(f"ci_chat_check: FAIL {failure}", file=sys.stderr)
    if not failures:
        print("ci_chat_check: same answer from both servers")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait")
    w.add_argument("url")
    w.add_argument("--timeout", type=float, default=120)
    c = sub.add_parser("compare")
    c.add_argument("url_a")
    c.add_argument("url_b")
    c.add_argument("--api-key")
    ns = parser.parse_args()
    if ns.command == "wait":
        return wait(loopback_only(ns.url), ns.timeout)
    return compare(loopback_only(ns.url_a), loopback_only(ns.url_b), ns.api_key)


if __name__ == "__main__":
    sys.exit(main())
