"""Serving on one GPU: smolbox's ONNX Runtime path (CUDA provider) against transformers' generate, same card, same
~1,125-token image prompt (a 512x384 image = 13 tiles).

    python -m bench.serve_bench --export exports/real --hf-model /tmp/rs/model --json serve_bench.json \
        [--ort-variants q4 fp16] [--hf bf16 nf4] [--http-variant q4 --clients 8 32]

Measures, per engine: time to first token (prefill incl. the vision encoder, median of --repeats after warm-up),
batch-1 greedy decode tokens/s over --new-tokens steps, and (ORT) the same through the HTTP server: `smolbox serve`
started in the background on 127.0.0.1 and driven by bench/serve_load.py with N concurrent streaming clients.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Describe this image in detail."


def image():
    import random

    from smolbox import tiny

    return tiny.draw("circle", tiny.COLORS["red"], (512, 384), random.Random(3))


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def session_config(text: str) -> dict[str, str]:
    """'default' -> {}; 'key=value,key2=value2' -> onnxruntime session config entries (e.g. ep.cuda.fpa_intb_gemm=1)."""
    return {} if text == "default" else dict(item.split("=", 1) for item in text.split(","))


def ort_engine(folder: Path, variant: str, new_tokens: int, repeats: int, batch: int, config: str = "default",
               profile: bool = False) -> dict:
    import numpy as np

    from smolbox.preprocess import Preprocessor, pad_batch
    from smolbox.runtime import OnnxVLM
    from smolbox.serve.engine import preload_cuda_libraries

    preload_cuda_libraries()
    started = time.perf_counter()
    model = OnnxVLM(folder, variant, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                    session_config=session_config(config))
    load_s = time.perf_counter() - started
    pre = Preprocessor(folder)
    pre.pixel_dtype = model.pixel_dtype  # as smolbox.serve does
    text = pre.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    enc = pre.encode(text, [image()])
    args = (enc.input_ids, enc.attention_mask, enc.pixel_values, enc.pixel_attention_mask)

    def first_token():
        step = model.prefill(*args)
        return step, step.logits.argmax(-1).astype(np.int64)

    ttft = median_ms(first_token, repeats)
    vision = median_ms(lambda: model._run("vision_encoder", {"pixel_values": enc.pixel_values,
                                                              "pixel_attention_mask": enc.pixel_attention_mask.astype(bool)}), repeats)
    ids, mask = model.pad_prompt(enc.input_ids, enc.attention_mask)  # as prefill() does
    embeds = model.embed(ids, enc.pixel_values, enc.pixel_attention_mask)
    prefill = median_ms(lambda: model.forward(embeds, mask, model.empty_past(1)), repeats)

    def decode_rate(rows: int) -> float:
        inputs = pad_batch([enc] * rows, pre.pad_token_id)
        step = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        tokens = step.logits.argmax(-1).astype(np.int64)
        for _ in range(3):  # warm the decode shapes
            step = model.decode(step, tokens)
        started = time.perf_counter()
        for _ in range(new_tokens):
            step = model.decode(step, tokens)
            tokens = step.logits.argmax(-1).astype(np.int64)
        return round(rows * new_tokens / (time.perf_counter() - started), 1)

    label = f"ORT {variant}" + ("" if config == "default" else f" [{config}]")
    out = {"engine": label, "session_config": session_config(config), "provider": model.provider,
           "prompt_tokens": int(enc.input_ids.shape[1]), "load_s": round(load_s, 1), "ttft_ms": ttft, "vision_ms": vision,
           "decoder_prefill_ms": prefill, "decode_tok_s_b1": decode_rate(1)}
    if batch > 1:
        out[f"decode_tok_s_b{batch}"] = decode_rate(batch)
    if profile:
        out["kernels"] = kernel_profile(model, args, label)
    return out


def kernel_profile(model, args: tuple, label: str, decode_steps: int = 16, top: int = 12) -> dict:
    """GPU kernels under one prefill (vision encoder included) and under `decode_steps` batch-1 decode steps
    (gpu_kernels): wall time against time the GPU spent in kernels and copies says whether a phase is launch-bound,
    the top kernels say where the GPU time goes."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device for the profiler"}
    step = model.prefill(*args)
    tokens = step.logits.argmax(-1).astype(np.int64)
    for _ in range(3):
        step = model.decode(step, tokens)
    state = {"step": step}

    def decode():
        for _ in range(decode_steps):
            state["step"] = model.decode(state["step"], tokens)

    phases = {"prefill": gpu_kernels(lambda: model.prefill(*args), 1, f"{label} prefill", top),
              "decode": gpu_kernels(decode, decode_steps, f"{label} decode", top)}
    release = getattr(model, "release", None)
    if release:
        release(state["step"])
    return phases


def gpu_kernels(fn, calls: int, label: str, top: int = 12) -> dict:
    """The GPU kernels and copies of one call of `fn` (which makes `calls` calls of the thing measured), recorded by
    torch.profiler: CUPTI sees every kernel of the process, onnxruntime's too. Per call: wall ms, GPU busy ms (the
    kernels' and copies' durations summed), kernel count and the `top` kernels by time."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device for the profiler"}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        wall = time.perf_counter() - started
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_name: dict[str, list] = {}
    for e in events:
        entry = by_name.setdefault(e["name"][:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e.get("dur", 0) / 1000
    busy = sum(ms for _, ms in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    out = {"wall_ms_per_call": round(wall * 1000 / calls, 3), "gpu_ms_per_call": round(busy / calls, 3),
           "kernels_per_call": round(sum(n for n, _ in by_name.values()) / calls, 1),
           "top": [{"name": name, "count_per_call": round(n / calls, 1), "ms_per_call": round(ms / calls, 4)}
                   for name, (n, ms) in rows[:top]]}
    print(f"{label}: wall {out['wall_ms_per_call']} ms/call, GPU busy {out['gpu_ms_per_call']} ms/call, "
          f"{out['kernels_per_call']} kernels/call", flush=True)
    for row in out["top"]:
        print(f"    {row['ms_per_call']:>9.4f} ms {row['count_per_call']:>6} x  {row['name']}", flush=True)
    return out


def profile_vision(folder: Path, variant: str, top: int = 15) -> dict:
    """onnxruntime's profiler over one vision-encoder run (after two warm-ups): time per operator type and the
    provider each ran on, to see where the vision milliseconds go."""
    import onnxruntime as ort

    from smolbox.onnx_layout import graph_path
    from smolbox.preprocess import Preprocessor
    from smolbox.serve.engine import preload_cuda_libraries

    preload_cuda_libraries()
    pre = Preprocessor(folder)
    text = pre.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    enc = pre.encode(text, [image()])
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(os.environ.get("OUT", "/tmp")) / f"vision_{variant}")
    session = ort.InferenceSession(str(graph_path(folder, "vision_encoder", variant)), options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    dtype = {"tensor(float16)": "float16"}.get(session.get_inputs()[0].type, "float32")
    feeds = {"pixel_values": enc.pixel_values.astype(dtype), "pixel_attention_mask": enc.pixel_attention_mask.astype(bool)}
    for _ in range(3):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    last = runs[-1]
    by_op: dict[tuple[str, str], float] = {}
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]:
            key = (e["args"].get("op_name", "?"), e["args"].get("provider", "?"))
            by_op[key] = by_op.get(key, 0.0) + e["dur"] / 1000
    rows = sorted(by_op.items(), key=lambda kv: -kv[1])
    out = {"variant": variant, "run_ms": round(last["dur"] / 1000, 2), "kernel_ms": round(sum(by_op.values()), 2),
           "ops": [{"op": op, "provider": provider, "ms": round(ms, 3)} for (op, provider), ms in rows]}
    print(f"vision {variant}: run {out['run_ms']} ms, node time {out['kernel_ms']} ms")
    for row in out["ops"][:top]:
        print(f"  {row['op']:<28} {row['provider']:<24} {row['ms']:>9.3f} ms")
    return out


def hf_engine(model_dir: Path, kind: str, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if kind == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs).eval()
    load_s = time.perf_counter() - started
    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[[image()]], return_tensors="pt").to("cuda")

    def generate(n: int):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()

    ttft = median_ms(lambda: generate(1), repeats)
    full = median_ms(lambda: generate(1 + new_tokens), max(1, repeats // 2), warmup=1)
    out = {"engine": f"transformers {kind}", "provider": "torch CUDA", "prompt_tokens": int(inputs["input_ids"].shape[1]),
           "load_s": round(load_s, 1), "ttft_ms": ttft, "decode_tok_s_b1": round(new_tokens / ((full - ttft) / 1000), 1),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del model
    torch.cuda.empty_cache()
    return out


def server_memory_mib(pid: int) -> dict:
    """The server process's resident memory and, on a GPU, the device memory it holds (MiB)."""
    out = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        out["rss_mib"] = round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024, 1)
    except (OSError, StopIteration):
        pass
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
        used = [int(m) for p_, m in (line.split(",") for line in apps.splitlines() if line.strip()) if int(p_) == pid]
        if used:
            out["gpu_mib"] = used[0]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return out


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process's main thread, the server's event loop (its task id is the pid)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_counters(url: str) -> dict[str, float]:
    """The server's engine counters from /metrics: seconds by phase, decode steps, rows decoded, prompt-cache hits and misses."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith('smolbox_engine_seconds_total{phase="'):
            out[name.split('"')[1] + "_s"] = float(value)
        elif name in ("smolbox_decode_steps_total", "smolbox_decode_rows_total", "smolbox_prompt_cache_hits_total",
                      "smolbox_prompt_cache_misses_total", "smolbox_queue_wait_seconds_sum", "smolbox_queue_wait_seconds_count",
                      "smolbox_time_to_first_token_seconds_sum", "smolbox_time_to_first_token_seconds_count",
                      "smolbox_preprocess_seconds_sum", "smolbox_preprocess_seconds_count",
                      "smolbox_body_read_seconds_sum", "smolbox_body_read_seconds_count",
                      "smolbox_prepare_work_seconds_sum", "smolbox_prepare_work_seconds_count"):
            out[name.removeprefix("smolbox_").removesuffix("_total")] = float(value)
    return out


def engine_breakdown(before: dict, after: dict, wall_s: float) -> dict:
    """What the engine thread did over a load run of `wall_s` seconds: seconds by phase (and their sum against the
    wall), decode steps, mean rows a step and wall ms per decode step."""
    delta = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in after}
    phases = sum(v for k, v in delta.items() if k.endswith("_s"))
    steps = delta.get("decode_steps", 0.0)
    # Server-side means over the run: request to first token, request to the queue (preprocessing; of it, reading the
    # body and the preparation's own work), queue to admission.
    for name in ("time_to_first_token", "preprocess", "body_read", "prepare_work", "queue_wait"):
        count = delta.pop(f"{name}_seconds_count", 0.0)
        total = delta.pop(f"{name}_seconds_sum", 0.0)
        delta[f"server_{name}_mean_ms"] = round(1e3 * total / count, 1) if count else None
    return {**delta, "wall_s": round(wall_s, 2), "phases_s": round(phases, 2),
            "mean_decode_rows": round(delta.get("decode_rows", 0.0) / steps, 2) if steps else None,
            "decode_ms_per_step": round(1e3 * delta.get("decode_s", 0.0) / steps, 3) if steps else None}


def http(folder: Path, variant: str, clients: list[int], seconds: float, max_tokens: int, max_batch: int,
         continuous: bool = True, ort_config: dict[str, str] | None = None, serve_set: dict[str, str] | None = None,
         samples: int = 1, prompts: list[str] = ("same",)) -> list[dict]:
    """`smolbox serve` under N streaming clients for `seconds`, per N and per kind of prompts (same: every request
    the same question about the same image; distinct: a numbered question each, the image the same); `serve_set`
    adds serve.* settings; the server's memory is read `samples` times over each load run (first and last tell
    whether it stays flat)."""
    from bench.serve_load import run

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "smolbox", "serve", "--config", "default", "--env-file", "",
           "--serve.model", str(folder), "--serve.variant", variant, "--serve.host", "127.0.0.1",
           "--serve.port", str(port), "--serve.max_batch_size", str(max_batch), "--serve.max_queue", "512",
           "--serve.continuous_batching", str(continuous).lower(), "--serve.ort_session_config", json.dumps(ort_config or {})]
    for key, value in (serve_set or {}).items():
        cmd += [f"--serve.{key}", value]
    log = open(Path(os.environ.get("OUT", "/tmp")) / f"serve_{variant}.log", "w")
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        health = json.loads(response.read())
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not come up (exit {server.poll()}); see serve_{variant}.log")
            time.sleep(1)
        run(url, 1, 3, 8, (512, 384), None)  # warm-up
        rows = []
        for n, kind in ((n, kind) for kind in prompts for n in clients):
            memory, part = [server_memory_mib(server.pid)], []
            counters, started, loop_cpu = engine_counters(url), time.perf_counter(), main_thread_cpu_s(server.pid)
            for _ in range(samples):  # one load run in `samples` parts, the server's memory read after each
                part.append(run(url, n, seconds / samples, max_tokens, (512, 384), None, distinct=kind == "distinct"))
                memory.append(server_memory_mib(server.pid))
            row = part[0] if samples == 1 else merge_load_parts(part)
            row["engine"] = engine_breakdown(counters, engine_counters(url), time.perf_counter() - started)
            # The event loop streams every token (SSE chunk, HTTP write) and holds the GIL meanwhile.
            loop_cpu = main_thread_cpu_s(server.pid) - loop_cpu
            tokens = row["tokens_per_s"] * row["seconds"]
            row["event_loop"] = {"cpu_s": round(loop_cpu, 2), "cpu_ms_per_1k_tokens": round(1e6 * loop_cpu / tokens, 1) if tokens else None}
            row.update(variant=variant, provider=health.get("provider"), max_batch_size=max_batch, max_tokens=max_tokens,
                       batching="continuous" if continuous else "static", ort_session_config=ort_config or {},
                       serve_set=serve_set or {}, server_memory=memory, server_memory_summary=memory_summary(memory))
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def memory_summary(readings: list[dict]) -> dict:
    """First, last and largest of each memory figure over a run's readings (rss_mib, gpu_mib), e.g. {"rss_mib":
    {"first": 5034.0, "last": 5331.0, "max": 5402.0}}; a figure no reading has is left out."""
    out = {}
    for key in ("gpu_mib", "rss_mib"):
        values = [r[key] for r in readings if key in r]
        if values:
            out[key] = {"first": values[0], "last": values[-1], "max": max(values)}
    return out


def merge_load_parts(parts: list[dict]) -> dict:
    """One load run's numbers from its consecutive parts: counts summed, rates over the whole time, each part's
    percentiles kept as a list (in order: drift over the run shows there)."""
    seconds = sum(p["seconds"] for p in parts)
    row = {"clients": parts[0]["clients"], "prompts": parts[0].get("prompts"), "seconds": round(seconds, 2), "parts": len(parts),
           "requests": sum(p["requests"] for p in parts), "errors": sum(p["errors"] for p in parts),
           "first_errors": [e for p in parts for e in p["first_errors"]][:3]}
    for rate in ("requests_per_s", "tokens_per_s"):
        row[rate] = sum(p[rate] * p["seconds"] for p in parts) / seconds
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
        row[key] = sorted(p[key] for p in parts)[len(parts) // 2]  # the median part's
        row[key + "_by_part"] = [p[key] for p in parts]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True, help="export folder (smolbox export output)")
    parser.add_argument("--hf-model", type=Path, default=None, help="the same model as a transformers folder")
    parser.add_argument("--ort-variants", nargs="*", default=["q4", "fp16"])
    parser.add_argument("--hf", nargs="*", default=["bf16", "nf4"])
    parser.add_argument("--http-variant", default="q4")
    parser.add_argument("--clients", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="serve.max_batch_size for the HTTP runs")
    parser.add_argument("--batching", nargs="+", default=["continuous"], choices=["continuous", "static"],
                        help="serve.continuous_batching for the HTTP runs; both = side by side")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="also decode this many rows at once (ORT, direct)")
    parser.add_argument("--profile-vision", nargs="*", default=[], help="variants whose vision encoder to profile")
    parser.add_argument("--session-configs", nargs="+", default=["default"],
                        help="ORT runs once per entry: 'default' or key=value[,key=value] session config entries")
    parser.add_argument("--profile-kernels", action="store_true", help="GPU kernel breakdown of prefill and decode (ORT)")
    parser.add_argument("--http-session-config", default="default", help="serve.ort_session_config of the HTTP server, "
                        "same form as --session-configs")
    parser.add_argument("--serve-sets", nargs="+", default=["default"],
                        help="HTTP runs once per entry: 'default' or key=value[,key=value] serve.* settings, side by side "
                        "(e.g. kv_slots=false image_cache_mb=0)")
    parser.add_argument("--prompts", nargs="+", default=["same"], choices=["same", "distinct"],
                        help="HTTP load per kind: same = every request the same question about the same image (the "
                        "issue's load; a prompt cache holds it), distinct = a numbered question each (none repeats)")
    parser.add_argument("--memory-samples", type=int, default=1, help="read the server's memory this many times per load "
                        "run (the run goes in as many parts of --seconds / N each, a reading after each; one more before)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results = {"engines": [], "http": [], "vision_profiles": []}

    def save():
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    for variant in args.profile_vision:
        try:
            results["vision_profiles"].append(profile_vision(args.export, variant))
        except Exception as exc:  # noqa: BLE001
            results["vision_profiles"].append({"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print("vision profile failed:", results["vision_profiles"][-1]["error"], flush=True)
        save()
    jobs = [("ort", (v, c)) for v in args.ort_variants for c in args.session_configs]
    jobs += [("hf", (k, None)) for k in (args.hf if args.hf_model else [])]
    for kind, (name, config) in jobs:
        try:
            row = ort_engine(args.export, name, args.new_tokens, args.repeats, args.batch, config, args.profile_kernels) \
                if kind == "ort" else hf_engine(args.hf_model, name, args.new_tokens, args.repeats)
        except Exception as exc:  # noqa: BLE001 - one engine failing must not hide the others
            row = {"engine": f"{kind} {name}", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(row), flush=True)
        results["engines"].append(row)
        save()
    if args.http_variant and args.clients:
        for mode in args.batching:
            for serve_set in args.serve_sets:  # one server failing (a bad setting) keeps the others' rows
                try:
                    results["http"] += http(args.export, args.http_variant, args.clients, args.seconds, args.max_tokens,
                                            args.max_batch, mode == "continuous", session_config(args.http_session_config),
                                            session_config(serve_set), args.memory_samples, args.prompts)
                except Exception as exc:  # noqa: BLE001
                    results["http"].append({"serve_set": serve_set, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                save()

    print(f"{'engine':<34} {'provider':<22} {'prompt':>6} {'TTFT ms':>8} {'vision ms':>9} {'prefill ms':>10} {'tok/s b1':>9} {'tok/s bN':>9}")
    for r in results["engines"]:
        if "error" in r:
            print(f"{r['engine']:<34} ERROR {r['error'][:100]}")
            continue
        batched = next((v for k, v in r.items() if k.startswith("decode_tok_s_b") and k != "decode_tok_s_b1"), "-")
        print(f"{r['engine']:<34} {r['provider']:<22} {r['prompt_tokens']:>6} {r['ttft_ms']:>8} {r.get('vision_ms', '-'):>9} "
              f"{r.get('decoder_prefill_ms', '-'):>10} {r['decode_tok_s_b1']:>9} {batched:>9}")
    for r in results["http"]:
        if "error" in r:
            print("HTTP ERROR", r["error"])
            continue
        settings = ",".join(f"{k}={v}" for k, v in r.get("serve_set", {}).items()) or "default"
        summary = memory_summary(r.get("server_memory") or [])
        memory = ", ".join(f"{label} {m['first']} -> {m['last']} (max {m['max']})" for label, m in
                           (("GPU", summary.get("gpu_mib")), ("RSS", summary.get("rss_mib"))) if m) or "not read"
        print(f"HTTP {r['variant']} {r.get('batching', 'continuous'):<10} {settings:<28} {r.get('prompts', 'same'):<8} {r['clients']:>3} clients "
              f"{r['seconds']:.0f} s: {r['tokens_per_s']:.1f} tok/s aggregate, {r['requests_per_s']:.2f} req/s, ttft p50 "
              f"{r['ttft_p50_s']:.3f} s p99 {r['ttft_p99_s']:.3f} s, latency p50 {r['latency_p50_s']:.2f} s, errors "
              f"{r['errors']}, server memory MiB ({len(r.get('server_memory') or [])} readings): {memory}")
        if r.get("engine"):
            e = r["engine"]
            phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in e.items() if k.endswith("_s") and k not in ("wall_s", "phases_s"))
            if r.get("event_loop"):
                print(f"     event loop (main thread) CPU {r['event_loop']['cpu_s']} s, {r['event_loop']['cpu_ms_per_1k_tokens']} ms per 1,000 tokens")
            print(f"     engine thread over {e['wall_s']:.0f} s: {phases} s (sum {e['phases_s']:.1f}); {e.get('decode_steps', 0):.0f} "
                  f"decode steps of {e['mean_decode_rows']} rows, {e['decode_ms_per_step']} ms each; server means: first "
                  f"token {e.get('server_time_to_first_token_mean_ms')} ms, preprocess {e.get('server_preprocess_mean_ms')} ms "
                  f"(body {e.get('server_body_read_mean_ms')}, preparing {e.get('server_prepare_work_mean_ms')}), "
                  f"queue wait {e.get('server_queue_wait_mean_ms')} ms")


if __name__ == "__main__":
    main()
