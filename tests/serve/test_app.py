"""A real server on loopback over a real tiny export, hit by a real HTTP client; and the serving path without torch."""

import base64
import concurrent.futures
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from smolbox.preprocess import Preprocessor
from smolbox.runtime import OnnxVLM

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, **serve):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "smolbox", "serve", "--config", "tiny", "--env-file", "",
                "--serve.model", str(folder), "--serve.port", str(self.port), "--serve.variant", "fp32"]
        for key, value in serve.items():
            args += [f"--serve.{key}", str(value)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None, self.proc.stdout.read()
            time.sleep(0.2)
        raise TimeoutError("server did not become healthy")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def post(url, body, key=API_KEY, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/v1/chat/completions", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def png(color, size=(48, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def chat(question, image: bytes | None, **extra):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_uri(image)}})
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12, **extra}


@pytest.fixture(scope="module")
def folder(random_export):
    return random_export


@pytest.fixture(scope="module")
def server(folder):
    server = Server(folder, api_key=API_KEY, max_batch_size=8, batch_wait_ms=20)
    yield server
    server.stop()


def pytorch_answer(folder, question, image: bytes | None, max_new_tokens=12):
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [[Image.open(io.BytesIO(image)).convert("RGB")]] if image else None
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    onnx_tokens = OnnxVLM(folder, "fp32", providers=["CPUExecutionProvider"]).generate(
        *(inputs[k].numpy() if k in inputs else None for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")),
        max_new_tokens=max_new_tokens)[0]
    assert onnx_tokens.tolist() == new[: len(onnx_tokens)].tolist()
    return processor.tokenizer.decode(new, skip_special_tokens=True)


def test_health_and_models(server):
    status, body = get(server.url + "/health")
    health = json.loads(body)
    assert status == 200 and health["provider"] == "CPUExecutionProvider" and health["variant"] == "fp32"
    status, body = get(server.url + "/v1/models", {"Authorization": f"Bearer {API_KEY}"})
    models = json.loads(body)
    assert status == 200 and models["object"] == "list" and models["data"][0]["object"] == "model"


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_greedy_over_http_equals_onnx_loop_and_pytorch_generate(server, folder, with_image):
    image = png((200, 40, 40)) if with_image else None
    status, body = post(server.url, chat("What color is the square?", image))
    assert status == 200, body
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] >= 1
    assert reply["choices"][0]["message"]["content"] == pytorch_answer(folder, "What color is the square?", image)


def test_stream_chunks_join_to_the_same_text(server):
    body = chat("Describe the image.", png((30, 30, 220)))
    whole = json.loads(post(server.url, body)[1])["choices"][0]["message"]["content"]
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps({**body, "stream": True,
                                     "stream_options": {"include_usage": True}}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == whole
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_sixteen_parallel_requests_are_batched_and_correct(server):
    colors = [(i * 15 % 256, 255 - i * 15 % 256, (i * 70) % 256) for i in range(16)]
    bodies = [chat(f"Question {i}: what color?", png(c, (32 + 4 * i, 40))) for i, c in enumerate(colors)]
    sequential = [json.loads(post(server.url, b)[1])["choices"][0]["message"]["content"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        parallel = list(pool.map(lambda b: post(server.url, b), bodies))
    assert all(status == 200 for status, _ in parallel), parallel
    assert [json.loads(b)["choices"][0]["message"]["content"] for _, b in parallel] == sequential
    metrics = get(server.url + "/metrics")[1]
    batches = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("smolbox_batch_size_count")))
    requests = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("smolbox_batch_size_sum")))
    assert requests / batches > 1, "concurrent requests were served one by one"


@pytest.fixture(scope="module")
def published_decoder_server(folder):
    """serve.kv_slots=false: the published decoder, its caches padded and stacked when rows join."""
    server = Server(folder, api_key=API_KEY, max_batch_size=8, batch_wait_ms=20, kv_slots="false")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def serial_rows_server(folder):
    """serve.overlap_rows=false: the engine thread takes the rows' tokens between decode steps (the default takes them
    on a thread of its own while the next decode step runs)."""
    server = Server(folder, api_key=API_KEY, max_batch_size=8, batch_wait_ms=20, overlap_rows="false")
    yield server
    server.stop()


@pytest.mark.parametrize("decoder", ["server", pytest.param("published_decoder_server", marks=pytest.mark.slow),
                                     pytest.param("serial_rows_server", marks=pytest.mark.slow)])
def test_requests_join_and_leave_a_running_batch(request, decoder):
    """Continuous batching: requests of different lengths arriving while others decode get the answers they get
    alone, and joined the running batch (fewer prefill batches than requests) rather than waiting for it; with the
    KV-slot decoder (the default), with the published one, and with the rows' work between decode steps."""
    server = request.getfixturevalue(decoder)
    bodies = [chat(f"Describe picture {i}.", png((40 * i, 90, 200 - 30 * i), (30 + 8 * i, 36)), max_tokens=200 if i == 0 else 10 * i)
              for i in range(5)]
    alone = [json.loads(post(server.url, b)[1]) for b in bodies]
    assert alone[0]["usage"]["completion_tokens"] >= 100, "the first answer is too short for the others to overlap it"
    alone = [a["choices"][0] for a in alone]

    def metric(name):
        lines = get(server.url + "/metrics")[1].splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith(name)))

    joins_before = metric("smolbox_batch_joins_total")

    def staggered(i):
        time.sleep(0.01 * i)  # the first request is still decoding when the others arrive
        return post(server.url, bodies[i])

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        together = list(pool.map(staggered, range(5)))
    assert all(status == 200 for status, _ in together), together
    for i, (_, body) in enumerate(together):
        choice = json.loads(body)["choices"][0]
        assert choice["message"]["content"] == alone[i]["message"]["content"], i
        assert choice["finish_reason"] == alone[i]["finish_reason"]
    assert metric("smolbox_batch_joins_total") - joins_before >= 1, "no request joined a running batch"


@pytest.mark.parametrize("decoder", ["server", pytest.param("serial_rows_server", marks=pytest.mark.slow)])
def test_sampling_with_a_seed_is_reproducible_and_stop_strings_cut(request, decoder):
    server = request.getfixturevalue(decoder)
    body = chat("Say something.", png((10, 200, 10)), temperature=1.0, top_p=0.9, seed=42, max_tokens=10)
    first, second = (json.loads(post(server.url, body)[1])["choices"][0]["message"]["content"] for _ in range(2))
    assert first == second
    greedy = json.loads(post(server.url, chat("Say something.", None, max_tokens=12))[1])["choices"][0]
    text = greedy["message"]["content"]
    if len(text) >= 3:
        stop = text[2:4]
        cut = json.loads(post(server.url, chat("Say something.", None, max_tokens=12, stop=[stop]))[1])["choices"][0]
        assert cut["message"]["content"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


HOSTILE = {
    "bad base64": lambda: chat("x", None) | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@notbase64"}}]}]},
    "not an image": lambda: chat("x", b"this is not an image at all"),
    "huge dimensions": lambda: chat("x", _huge_png()),
    "remote url": lambda: chat("x", None) | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]},
    "messages not a list": lambda: {"messages": "hello"},
    "wrong role": lambda: {"messages": [{"role": "robot", "content": "hi"}]},
    "max_tokens as string": lambda: chat("x", None, max_tokens="12"),
    "max_tokens over limit": lambda: chat("x", None, max_tokens=10**6),
    "temperature out of range": lambda: chat("x", None, temperature=5),
    "n above 1": lambda: chat("x", None, n=2),
    "prompt over limit": lambda: chat("x " * 5000, None),
    "too many images": lambda: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png((1, 2, 3)))}}] * 5}]},
    "unknown model": lambda: chat("x", None, model="gpt-4o"),
}


def _huge_png() -> bytes:
    # A valid PNG header claiming 100000 x 100000 pixels: must be refused before any pixel is decoded.
    import struct
    import zlib

    def block(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + block(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + block(b"IEND", b"")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_get_4xx_and_the_server_keeps_serving(server, case):
    status, body = post(server.url, HOSTILE[case]())
    assert 400 <= status < 500, (status, body)
    error = json.loads(body)["error"]
    assert error["message"] and error["type"]
    assert post(server.url, chat("Still there?", None, max_tokens=3))[0] == 200


def test_malformed_json_missing_key_and_oversized_body(server):
    status, body = post(server.url, None, raw=b"{not json")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    assert post(server.url, chat("x", None), key=None)[0] == 401
    assert post(server.url, chat("x", None), key="wrong")[0] == 401
    # The declared size is enough to refuse: the server answers before reading (or waiting for) the body.
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Authorization", f"Bearer {API_KEY}")
    connection.putheader("Content-Length", "25000000")
    connection.endheaders(b"{")
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    assert post(server.url, chat("ok", None, max_tokens=2))[0] == 200


def test_metrics_are_prometheus_text(server):
    post(server.url, chat("count me", None, max_tokens=2))
    status, text = get(server.url + "/metrics")
    assert status == 200
    for name in ("smolbox_requests_total", "smolbox_request_errors_total", "smolbox_request_latency_seconds_bucket",
                 "smolbox_time_to_first_token_seconds_bucket", "smolbox_generated_tokens_total", "smolbox_queue_depth"):
        assert name in text, name
    # The engine thread's time by phase, and its decode steps: a 2-token answer took a prefill and a decode step.
    for phase in ("rows", "decode", "prefill"):
        assert metric(server, f'smolbox_engine_seconds_total{{phase="{phase}"}}') > 0, phase
    steps, rows = metric(server, "smolbox_decode_steps_total"), metric(server, "smolbox_decode_rows_total")
    assert steps >= 1 and rows >= steps
    # Preprocessing time, and of it the body's reading and the preparation's own work (in its thread)
    for part in ("preprocess", "body_read", "prepare_work"):
        assert metric(server, f"smolbox_{part}_seconds_count") >= 1 and metric(server, f"smolbox_{part}_seconds_sum") > 0, part


@pytest.mark.slow  # a server process of its own (queue of 1), then SIGTERM
def test_full_queue_gets_429_then_sigterm_drains_in_flight_requests(folder):
    server = Server(folder, max_batch_size=1, max_queue=1, batch_wait_ms=0)
    try:
        body = chat("long answer please", png((5, 5, 5)), max_tokens=60)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: post(server.url, body, key=None), range(8)))
        statuses = [s for s, _ in results]
        assert 429 in statuses and 200 in statuses, statuses
        rejected = json.loads(next(b for s, b in results if s == 429))["error"]
        assert rejected["type"] == "rate_limit_error"

        # Stream a long answer; SIGTERM after the first chunk; the answer must still arrive whole.
        body = {**chat("finish me", png((9, 9, 9)), max_tokens=300), "stream": True}
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        after_signal = []
        with urllib.request.urlopen(request, timeout=120) as response:
            response.readline()
            server.proc.send_signal(signal.SIGTERM)
            for raw in response:
                if raw.startswith(b"data: "):
                    after_signal.append(raw[6:].strip())
        assert after_signal[-1] == b"[DONE]" and len(after_signal) > 2
        assert json.loads(after_signal[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is SIGTERM's.
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.proc.stdout.read()
    finally:
        server.stop()


def metric(server, name) -> float:
    """A counter's or gauge's value from /metrics (0 when it has no sample yet)."""
    lines = get(server.url + "/metrics")[1].splitlines()
    return next((float(line.split()[-1]) for line in lines if line.split(" ")[0] == name), 0.0)


def test_a_repeated_image_skips_the_vision_encoder_and_gets_the_same_answer(server, folder):
    """The same image with another question (another prompt: the prompt cache does not hold it) reuses the image's
    vision features; its answer is the one a server without the image cache gives."""
    image = png((123, 45, 67), (52, 44))
    body, again = chat("What is in this picture?", image, max_tokens=8), chat("And what colour is it?", image, max_tokens=8)
    calls, hits, misses = (metric(server, f"smolbox_{n}") for n in ("vision_encoder_calls_total", "image_cache_hits_total", "image_cache_misses_total"))
    assert post(server.url, body)[0] == 200
    assert metric(server, "smolbox_vision_encoder_calls_total") == calls + 1
    assert metric(server, "smolbox_image_cache_misses_total") == misses + 1
    second = json.loads(post(server.url, again)[1])["choices"][0]["message"]["content"]
    assert metric(server, "smolbox_vision_encoder_calls_total") == calls + 1, "the repeated image was encoded again"
    assert metric(server, "smolbox_image_cache_hits_total") == hits + 1
    assert metric(server, "smolbox_image_cache_bytes") > 0
    assert second == onnx_answer(folder, again)


def onnx_answer(folder, body) -> str:
    """A chat body's greedy answer from the ONNX runtime's own loop, in this process (no server, no caches)."""
    pre = Preprocessor(folder)
    content = body["messages"][0]["content"]
    images = [Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))).convert("RGB")
              for part in content if part["type"] == "image_url"]
    text = pre.render_chat([{"role": "user", "content": [{"type": "image"} if p["type"] == "image_url" else p for p in content]}])
    enc = pre.encode(text, images)
    tokens = OnnxVLM(folder, "fp32", providers=["CPUExecutionProvider"]).generate(
        enc.input_ids, enc.attention_mask, enc.pixel_values, enc.pixel_attention_mask, max_new_tokens=body["max_tokens"])[0]
    ends = [i for i, t in enumerate(tokens.tolist()) if t in pre.eos_token_ids]
    return pre.decode(tokens[: ends[0]] if ends else tokens)


def test_a_repeated_prompt_is_not_prefilled_again_and_gets_the_same_answer(server):
    """The same prompt again (a retry): its KV comes from the prompt cache, with no vision-encoder call and no
    prefill, and the answer is the same, alone and with copies of it arriving together."""
    body = chat("Describe it once more.", png((12, 140, 200), (40, 56)), max_tokens=10)
    hits, misses, calls = (metric(server, f"smolbox_{n}") for n in ("prompt_cache_hits_total", "prompt_cache_misses_total", "vision_encoder_calls_total"))
    first = json.loads(post(server.url, body)[1])["choices"][0]["message"]["content"]
    assert metric(server, "smolbox_prompt_cache_misses_total") == misses + 1
    assert metric(server, "smolbox_prompt_cache_bytes") > 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: post(server.url, body), range(4)))
    assert [json.loads(b)["choices"][0]["message"]["content"] for _, b in again] == [first] * 4
    assert metric(server, "smolbox_prompt_cache_hits_total") == hits + 4
    assert metric(server, "smolbox_prompt_cache_misses_total") == misses + 1
    assert metric(server, "smolbox_vision_encoder_calls_total") == calls + 1


@pytest.mark.slow  # a server process of its own (caches off); tests/serve/test_scheduler.py checks the batching in-process
def test_images_of_waiting_requests_go_through_the_vision_encoder_together(folder):
    """With the image cache off, eight image requests arriving together are encoded in fewer vision-encoder calls
    than images, and each gets the answer it gets alone (one image, one call)."""
    server = Server(folder, max_batch_size=8, batch_wait_ms=50, image_cache_mb=0, prompt_cache_mb=0)
    try:
        bodies = [chat(f"Picture {i}?", png((25 * i, 200 - 20 * i, 90), (36 + 5 * i, 44)), max_tokens=6) for i in range(8)]
        alone = [json.loads(post(server.url, b, key=None)[1])["choices"][0]["message"]["content"] for b in bodies]
        calls = metric(server, "smolbox_vision_encoder_calls_total")
        assert calls == 8 and metric(server, "smolbox_image_cache_hits_total") == 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda b: post(server.url, b, key=None), bodies))
        assert [json.loads(b)["choices"][0]["message"]["content"] for _, b in together] == alone
        assert metric(server, "smolbox_image_cache_misses_total") == 16
        assert metric(server, "smolbox_vision_encoder_calls_total") - calls < 8, "every image was encoded on its own"
    finally:
        server.stop()


@pytest.mark.slow  # a server process of its own (a prefill budget of 1); tests/serve/test_scheduler.py checks the budget in-process
def test_newcomers_prefill_one_budget_a_step_and_still_get_their_answers(folder):
    """serve.max_prefill_tokens_per_step below one prompt: every newcomer is prefilled in a step of its own (a
    lone request always runs), between decode steps of the rows already running, and joins them; answers are
    those each request gets alone."""
    server = Server(folder, max_batch_size=8, batch_wait_ms=20, max_prefill_tokens_per_step=1, prompt_cache_mb=0)
    try:
        bodies = [chat(f"Tell me about picture {i}.", png((60 * i, 20, 90), (28 + 6 * i, 40)), max_tokens=150 if i == 0 else 8 + 4 * i)
                  for i in range(5)]
        alone = [json.loads(post(server.url, b, key=None)[1])["choices"][0]["message"]["content"] for b in bodies]
        batches, joins = metric(server, "smolbox_batch_size_count"), metric(server, "smolbox_batch_joins_total")

        def staggered(i):
            time.sleep(0.05 if i else 0)  # the others arrive together while the first decodes
            return post(server.url, bodies[i], key=None)

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            together = list(pool.map(staggered, range(5)))
        assert [json.loads(b)["choices"][0]["message"]["content"] for _, b in together] == alone
        assert metric(server, "smolbox_batch_size_count") - batches == 5, "newcomers were prefilled together"
        assert metric(server, "smolbox_batch_size_sum") == metric(server, "smolbox_batch_size_count")
        assert metric(server, "smolbox_batch_joins_total") - joins >= 3, "newcomers did not join the running row"
    finally:
        server.stop()


@pytest.mark.slow  # a server process of its own (a small KV capacity); tests/serve/test_scheduler.py checks the order in-process
def test_kv_capacity_queues_then_429s_and_a_request_over_it_gets_400(server, folder):
    """serve.max_kv_tokens room for one request: a second waits in the queue (never two in flight), a third finds
    the queue (serve.max_queue=1) full and gets 429; a request that could never fit gets 400 naming the param."""
    body = chat("A long answer, please.", png((7, 77, 177)), max_tokens=60)
    prompt_tokens = json.loads(post(server.url, body)[1])["usage"]["prompt_tokens"]
    capacity = prompt_tokens + 60
    small = Server(folder, max_batch_size=8, batch_wait_ms=0, max_queue=1, max_kv_tokens=capacity)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: post(small.url, body, key=None), range(8)))
        statuses = [s for s, _ in results]
        assert statuses.count(200) >= 2 and 429 in statuses, statuses
        assert json.loads(next(b for s, b in results if s == 429))["error"]["type"] == "rate_limit_error"
        assert len({json.loads(b)["choices"][0]["message"]["content"] for s, b in results if s == 200}) == 1
        assert metric(small, "smolbox_batch_joins_total") == 0, "two requests were in flight together"
        assert metric(small, "smolbox_batch_size_sum") == metric(small, "smolbox_batch_size_count")
        assert metric(small, "smolbox_kv_tokens_reserved") == 0

        status, text = post(small.url, {**body, "max_tokens": 61}, key=None)
        error = json.loads(text)["error"]
        assert status == 400 and error["param"] == "max_tokens" and error["code"] == "context_length_exceeded", text
        status, text = post(small.url, chat("word " * capacity, None, max_tokens=1), key=None)
        assert status == 400 and json.loads(text)["error"]["param"] == "messages", text
        assert post(small.url, body, key=None)[0] == 200
    finally:
        small.stop()


def exchange(url, body=None, headers=None, path="/v1/chat/completions"):
    """(status, headers, body text) of one request; a body makes it a POST."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def test_api_key_must_match_exactly_and_a_401_names_the_bearer_scheme(server):
    """hmac.compare_digest decides; its constant time is not measured here (speed and timing belong in benchmarks)."""
    for wrong in (API_KEY[:-1], API_KEY + "x", API_KEY[:-1] + "X", "", f"bearer {API_KEY}"):
        status, headers, body = exchange(server.url, headers={"Authorization": f"Bearer {wrong}"} if wrong else {}, path="/v1/models")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (wrong, status)
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert exchange(server.url, headers={"Authorization": f"Bearer {API_KEY}"}, path="/v1/models")[0] == 200


@pytest.mark.slow  # a server process of its own (JSON log lines on its stdout)
def test_json_request_log_and_request_ids(folder):
    server = Server(folder, api_key=API_KEY, log_format="json")
    secret_question = "What is the secret word hidden in zebra stripes?"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        status, headers, body = exchange(server.url, chat(secret_question, png((1, 2, 3)), max_tokens=5),
                                         {**auth, "X-Request-ID": "gateway-42"})
        assert status == 200 and headers["X-Request-ID"] == "gateway-42"
        usage = json.loads(body)["usage"]
        status, headers, streamed = exchange(server.url, {**chat("stream it", None, max_tokens=4), "stream": True},
                                             {**auth, "X-Request-ID": "bad id\twith spaces"})
        assert status == 200 and len(headers["X-Request-ID"]) == 32 and headers["X-Request-ID"] != "bad id"
        stream_id = headers["X-Request-ID"]
        assert streamed.rstrip().endswith("data: [DONE]")
        status, headers, _ = exchange(server.url, chat("no key", None))
        assert status == 401 and headers["X-Request-ID"] and headers["WWW-Authenticate"] == "Bearer"
        unauthorized_id = headers["X-Request-ID"]
    finally:
        server.stop()
    output = server.proc.stdout.read()
    lines = [line for line in output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line the server printed is one JSON object
    assert any(r["logger"].startswith("uvicorn") for r in records) and any(r["logger"] == "smolbox.serve" for r in records)
    assert any("KV slots" in r.get("message", "") for r in records if r["logger"] == "smolbox.serve")  # the slot decoder served
    access = {r["request_id"]: r for r in records if r["logger"] == "smolbox.serve.access"}
    first = access["gateway-42"]
    assert (first["method"], first["path"], first["status"]) == ("POST", "/v1/chat/completions", 200)
    assert first["latency_ms"] > 0
    assert (first["prompt_tokens"], first["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert access[stream_id]["status"] == 200 and access[stream_id]["completion_tokens"] >= 1
    assert access[unauthorized_id]["status"] == 401 and "prompt_tokens" not in access[unauthorized_id]
    assert "/health" not in {r["path"] for r in access.values()}  # probes are logged at debug level
    assert secret_question not in output and "zebra" not in output and "base64" not in output and "stream it" not in output


def test_the_serving_path_runs_without_torch(folder):
    """The serving image has no torch: smolbox.serve, everything it imports and a whole request (the app, the engine,
    preprocessing, ONNX Runtime, an HTTP round trip) run with torch and the training stack unimportable."""
    script = f"""
import json, sys
for name in ("torch", "transformers", "datasets", "trl", "peft", "bitsandbytes", "accelerate", "matplotlib"):
    sys.modules[name] = None  # any import of these now raises ImportError
from PIL import Image
from smolbox.config import load_config
from smolbox.serve import demo_request
cfg = load_config("tiny", overrides={{"serve.model": {str(folder)!r}, "serve.variant": "fp32"}}, env={{}}, dotenv=None)
print(json.dumps(demo_request(cfg, Image.new("RGB", (48, 64), (200, 40, 40)), "What color is the square?")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(answer, str) and answer == pytorch_answer(folder, "What color is the square?", png((200, 40, 40)), 16)


@pytest.mark.slow  # a server process of its own and its preprocessing workers
def test_preprocessing_in_worker_processes_gives_the_same_answers_and_errors(server, folder):
    """serve.preprocess_workers=2: requests are validated, their images decoded and tiled and their text tokenized
    in two spawned worker processes. Answers (image and text prompts, a repeated image from the cache, requests in
    parallel), and every hostile input's status and error body (an APIError raised in a worker), equal those of the
    threaded server; SIGTERM leaves no worker process behind."""
    workers = Server(folder, api_key=API_KEY, max_batch_size=8, batch_wait_ms=20, preprocess_workers=2)
    try:
        def answer(target, body):
            status, text = post(target.url, body)
            return status, json.loads(text)["choices"][0] if status == 200 else json.loads(text)

        picture = chat("What is in this picture?", png((123, 45, 67), (52, 44)), max_tokens=8)
        for body in (picture, picture, chat("Say something.", None, max_tokens=8)):
            assert answer(workers, body) == answer(server, body)
        bodies = [chat(f"Picture {i}?", png((25 * i, 200 - 20 * i, 90), (36 + 5 * i, 44)), max_tokens=6) for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda b: answer(workers, b), bodies))
        assert together == [answer(server, b) for b in bodies]
        for case, make in HOSTILE.items():
            body = make()
            assert post(workers.url, body) == post(server.url, body), case
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(workers.proc.pid)], capture_output=True,
                                                       text=True).stdout.split()]
        assert len(children) >= 2, "no worker processes"  # two workers (spawn may add its resource tracker)
        workers.stop()

        def alive(pid):  # a zombie (exited, not yet reaped where no init process reaps orphans) counts as gone
            try:
                return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                return False

        deadline = time.time() + 10
        while any(alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)], "a worker process outlived the server"
    finally:
        workers.stop()


def test_token_chunks_are_the_json_of_their_fields_and_text_that_waits_together_is_one_chunk():
    """_Completion.stream writes token chunks from a template made once: each parses to the chunk json.dumps makes,
    for text with quotes, backslashes, a newline, NUL and non-ASCII characters (a model name with a quote too); text
    events that wait in the queue together (the engine ran ahead of the loop) go out as one chunk."""
    import asyncio

    from smolbox.serve.app import _Completion
    from smolbox.serve.engine import GenRequest
    from smolbox.serve.metrics import Metrics

    loop = asyncio.new_event_loop()
    try:
        job = GenRequest(encoded=None, prompt_tokens=3, max_tokens=8, temperature=0.0, top_p=1.0, seed=None, stop=[],
                         events=asyncio.Queue(), loop=loop)
        pieces = ['a "quoted" word', "back\\slash", "new\nline", "nul\0", "é中🙂"]
        for event in [("first_token",), *(("token", p) for p in pieces), ("done", "length", 5)]:
            job.events.put_nowait(event)
        completion = _Completion("chatcmpl-x", 1, 'model"name', job, Metrics(), {})

        async def collect():
            return [c async for c in completion.stream(include_usage=True)]

        chunks = loop.run_until_complete(collect())
    finally:
        loop.close()
    assert chunks[-1] == "data: [DONE]\n\n" and all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    bodies = [json.loads(c[len("data: "):]) for c in chunks[:-1]]
    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": 'model"name', "system_fingerprint": None}
    assert bodies[1] == {**head, "choices": [{"index": 0, "delta": {"content": "".join(pieces)}, "logprobs": None,
                                              "finish_reason": None}], "usage": None}
    assert [b["choices"][0]["delta"] if b["choices"] else b["usage"] for b in bodies] == [
        {"role": "assistant", "content": ""}, {"content": "".join(pieces)}, {},
        {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}]
