"""Load test for a running smolbox server: N concurrent clients for T seconds, each sending one chat request with an
image after the other. Prints requests/s, tokens/s, latency and time-to-first-token percentiles, and errors.

    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 8 --seconds 30 [--max-tokens 64] [--distinct-prompts]
        [--json out.json]

Uses streaming so that time to first token is measured at the client. Standard library only: it runs anywhere.
Point it only at servers you run (loopback or your own hosts).
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A PNG built by hand, so the benchmark needs no imaging library."""
    row = b"\x00" + bytes(rgb) * width
    raw = zlib.compress(row * height)

    def block(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + block(b"IHDR", header) + block(b"IDAT", raw) + block(b"IEND", b"")


def one_request(url: str, body: bytes, headers: dict) -> dict:
    started = time.perf_counter()
    first = None
    tokens = 0
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"latency": time.perf_counter() - started, "ttft": first, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(url: str, clients: int, seconds: float, max_tokens: int, image_size: tuple[int, int], api_key: str | None,
        distinct: bool = False) -> dict:
    """Every request asks the same question about the same image; `distinct`: each asks its own (the question
    numbered), so no two prompts are equal (a server's prompt cache never holds one) while the image repeats."""
    image = base64.b64encode(solid_png(*image_size, (180, 60, 40))).decode()

    def body(number: int) -> bytes:
        text = "Describe this image in detail." + (f" (request {number})" if distinct else "")
        return json.dumps({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": text}]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        }).encode()

    same = body(0)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    sent = [0]

    def client():
        while time.perf_counter() < stop_at:
            with lock:
                sent[0] += 1
                number = sent[0]
            outcome = one_request(url, body(number) if distinct else same, headers)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "clients": clients, "prompts": "distinct" if distinct else "same", "seconds": round(elapsed, 2), "requests": len(results), "errors": len(results) - len(ok),
        "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "first_errors": [r["error"] for r in results if "error" in r][:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image", default="512x384", help="WxH of the test image")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--distinct-prompts", action="store_true", help="each request asks its own question (numbered)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    size = tuple(int(x) for x in args.image.lower().split("x"))
    rows = [run(args.url, n, args.seconds, args.max_tokens, size, args.api_key, args.distinct_prompts) for n in args.clients]
    print(f"{'clients':>7} {'req/s':>8} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'ttft50 s':>9} {'ttft99 s':>9} {'errors':>6}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['latency_p50_s']:>8.3f} "
              f"{r['latency_p99_s']:>8.3f} {r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f} {r['errors']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
