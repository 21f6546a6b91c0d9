"""The server's KV-slot decoder (smolbox/serve/kv_decoder.py) on a GPU: does it run, does the CUDA graph replay give
the tokens of the same decoder without it, and what does it decode per second against the published decoder.

    python -m bench.kv_slots_bench --export exports/real --variant q4f16 [--slots 8] [--steps 64] [--json out.json]
    python -m bench.kv_slots_bench --tiny            # a random-weight tiny export made on the spot (torch needed)

Per runtime (published decoder = runtime.OnnxVLM; slots without / with the CUDA graph = kv_decoder.SlotVLM):
greedy tokens of a join-and-leave run (two prompts of different lengths: B joins while A decodes, B leaves early,
A finishes alone), compared with each prompt generated alone by the published decoder; then decode tokens/s at
batch 1 and with every slot busy. The CUDA-graph runtime captures one graph per batch bucket (powers of two up to
the slot count): the join-and-leave run goes through buckets 1 -> 2 -> 1, batch 1 replays bucket 1, every slot busy
the slot count's; `graph_buckets` lists those captured (all of them at load: `graph_capture_s`). The CUDA-graph
runtime must give the tokens of the slot runtime without it (same kernels), and its greedy tokens (the decoder's
ArgMax, on the device) those of the host's argmax over its logits; against the published decoder
(MultiHeadAttention) fp16 rounding may flip a late token, so that is reported, not failed. Exit status 1 when the
graph and non-graph slot runtimes disagree, the device's ArgMax disagrees with the host's, or the graph did not turn
on. Decode rates read each step's greedy tokens as the server does, and once more with the logits copied to the host
(`_logits_to_host`, the step before the decoder had its ArgMax). Slot runtimes also time a prompt-cache reuse of
one prompt (its KV copied into a slot) against that prompt's prefill, and check that the reused prompt decodes the
tokens it decodes alone (exit status 1 if not). --prefill-dequantized adds the graph runtime with prefills through
the dequantized decoder (serve.prefill_dequantized): its prefill times, and its tokens against the others'.
--profile records the GPU kernels (bench.serve_bench.kernel_profile) of the CUDA-graph runtimes' one-row prefill of
the image prompt and of their batch-1 decode steps.

Batched prefill (slot runtimes): A and B prefilled in one call (right-padded, serve.batch_prefill) against each
prefilled alone: the first logits' largest difference (fp16 rounding is ~1e-2; a wrong position or mask is of the
order of the logits themselves) and the greedy tokens' agreement, reported; then the time to prefill --slots copies
of A in one call against one call per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def tiny_export(root: Path) -> Path:
    from smolbox import tiny
    from smolbox.config import load_config
    from smolbox.export import export

    tiny.ensure_bundle()
    base = root / "random-base"
    tiny.build_model().save_pretrained(base)
    tiny.build_processor().save_pretrained(base)
    overrides = {"model.id": str(base), "export.source": "base", "run.name": "kv-slots", "export.output_dir": str(root),
                 "export.variants": ["fp32", "fp16", "q4", "q4f16"]}
    return export(load_config("tiny", overrides=overrides, env={}, dotenv=None)).folder


def prompts(folder: Path, pixel_dtype) -> list[dict]:
    """A: an image prompt; B: a shorter text prompt. Each one row, no padding."""
    from PIL import Image, ImageDraw

    from smolbox.preprocess import Preprocessor

    picture = Image.new("RGB", (512, 384), (235, 235, 235))
    ImageDraw.Draw(picture).ellipse((156, 92, 356, 292), fill=(200, 30, 30))

    pre = Preprocessor(folder)
    pre.pixel_dtype = pixel_dtype
    a = pre.encode(pre.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}]), [picture])
    b = pre.encode(pre.render_chat([{"role": "user", "content": [{"type": "text", "text": "Write a long story about a lighthouse."}]}]))
    return [{"input_ids": e.input_ids, "attention_mask": e.attention_mask, "pixel_values": e.pixel_values,
             "pixel_attention_mask": e.pixel_attention_mask} for e in (a, b)]


def prefill(model, p: dict):
    """One model.prefill of prompt `p`, or of a batch from `padded`."""
    return model.prefill(p["input_ids"], p["attention_mask"], p.get("pixel_values"), p.get("pixel_attention_mask"))


def padded(rows: list[dict]) -> dict:
    """Prompts `rows` left-padded into one batch."""
    from smolbox.preprocess import Encoded, pad_batch

    return pad_batch([Encoded(p["input_ids"], p["attention_mask"], p["pixel_values"], p["pixel_attention_mask"]) for p in rows], 0)


def alone(model, p: dict, steps: int) -> list[int]:
    step, tokens = prefill(model, p), []
    for _ in range(steps):
        tokens.append(int(step.logits[0].argmax()))
        step = model.decode(step, np.array(tokens[-1:], np.int64))
    model.release(step)
    return tokens


def join_and_leave(model, a: dict, b: dict, steps: int) -> tuple[dict[str, list[int]], int]:
    """A decodes (slot 0); B joins after 3 steps (slot 1); B leaves after steps // 2 tokens; A runs to `steps` tokens
    (with CUDA graphs: buckets 1, 2, then 1 again). Also returns how many greedy tokens (on the graph path the
    decoder's ArgMax on the device) differ from the argmax of the logits on the host."""
    produced, owners, mismatches = {"a": [], "b": []}, ["a"], 0
    limit = {"a": steps, "b": steps // 2}
    step = prefill(model, a)
    for t in range(2 * steps):
        tokens = step.greedy
        mismatches += int((tokens != step.logits.argmax(-1)).sum())
        for row, owner in enumerate(owners):
            produced[owner].append(int(tokens[row]))
        keep = [i for i, o in enumerate(owners) if len(produced[o]) < limit[o]]
        if not keep:
            model.release(step)
            break
        if len(keep) < len(owners):
            step, owners, tokens = model.select(step, keep), [owners[i] for i in keep], tokens[keep]
        step = model.decode(step, tokens)
        if t == 2:
            step, owners = model.merge(step, prefill(model, b)), owners + ["b"]
    return produced, mismatches


def batched_prefill(model, a: dict, b: dict, steps: int) -> dict:
    """A and B prefilled together in one call, then decoded together, against each alone on the same runtime."""
    step = prefill(model, padded([a, b]))
    first, together = step.logits.copy(), [[], []]
    for _ in range(steps):
        tokens = step.logits.argmax(-1).astype(np.int64)
        for row in range(2):
            together[row].append(int(tokens[row]))
        step = model.decode(step, tokens)
    model.release(step)
    single = []
    for p in (a, b):
        one = prefill(model, p)
        single.append(one.logits[0].copy())
        model.release(one)
    alone_tokens = [alone(model, p, steps) for p in (a, b)]
    return {"max_first_logit_diff": round(float(np.abs(first - np.stack(single)).max()), 5),
            "token_agreement": [float(np.mean(np.array(t) == np.array(r))) for t, r in zip(together, alone_tokens)]}


def prefill_ms(model, p: dict, rows: int, repeats: int = 3) -> float:
    """Median ms to prefill `rows` copies of prompt `p` (image encoded each time, as a server without image cache)."""
    batch, times = padded([p] * rows), []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        step = prefill(model, batch)
        times.append(time.perf_counter() - started)
        model.release(step)
    return round(sorted(times[1:])[len(times[1:]) // 2] * 1000, 2)


def decode_rate(model, p: dict, rows: int, steps: int, logits: bool = False) -> float:
    """Tokens/s of `rows` copies of prompt `p` decoding together (prefilled as one batch), reading each step's greedy
    tokens as the server does (on the graph path the decoder's ArgMax); `logits`: its logits instead, copied to the
    host and argmaxed there (what every step did before the ArgMax, and what a sampling row still needs)."""
    step = prefill(model, padded([p] * rows))
    tokens = step.greedy
    for _ in range(5):  # warm-up (and, with the CUDA graph, its capture)
        step = model.decode(step, tokens)
    started = time.perf_counter()
    for _ in range(steps):
        step = model.decode(step, tokens)
        tokens = step.logits.argmax(-1).astype(np.int64) if logits else step.greedy
    rate = rows * steps / (time.perf_counter() - started)
    model.release(step)
    return round(rate, 1)


def prefill_ms_new_lengths(model, p: dict, extra: int = 3) -> list[float]:
    """ms of one-row prefills of prompt `p` with 1 .. `extra` more tokens, each length new to the runtime: what a
    server sees with prompts of every length (an attention kernel that plans per shape pays here, not in
    prefill_ms, which repeats one length)."""
    times = []
    for n in range(1, extra + 1):
        ids = np.concatenate([p["input_ids"], np.repeat(p["input_ids"][:, -2:-1], n, axis=1)], axis=1)
        mask = np.ones_like(ids)
        started = time.perf_counter()
        step = model.prefill(ids, mask, p["pixel_values"], p["pixel_attention_mask"])
        times.append(round((time.perf_counter() - started) * 1000, 2))
        model.release(step)
    return times


def prompt_reuse(model, p: dict, steps: int, repeats: int = 5) -> dict:
    """Prompt `p` kept in the prompt cache, then taken into a slot from there (its KV copied in) while another copy
    of it decodes in slot 0: the greedy tokens it then decodes against those of `p` alone (equal, or reuse is
    wrong), and the median ms of a reuse, against which prefill_ms's one-row figure is the prefill it replaces."""
    step = prefill(model, p)
    model.remember([b"p"], step)
    model.release(step)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        step = model.reuse([b"p"])
        times.append(time.perf_counter() - started)
        model.release(step)
    running = prefill(model, p)
    step, tokens = model.merge(running, model.reuse([b"p"])), []
    for _ in range(steps):
        tokens.append(int(step.greedy[1]))
        step = model.decode(step, step.greedy)
    model.release(step)
    return {"reuse_ms_1_row": round(sorted(times[1:])[len(times[1:]) // 2] * 1000, 3),
            "tokens_equal_alone": tokens == alone(model, p, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="export folder (else --tiny)")
    parser.add_argument("--tiny", action="store_true", help="make a random-weight tiny export in a temporary folder")
    parser.add_argument("--variant", default="q4f16")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64, help="greedy tokens per check and decode steps per rate")
    parser.add_argument("--prefill-dequantized", action="store_true",
                        help="also the graph runtime with serve.prefill_dequantized (its prefill times and tokens)")
    parser.add_argument("--attention-kernels", nargs="*", type=int, default=[],
                        help="also the CUDA-graph runtime with these serve.attention_kernel values (0 = onnxruntime's choice)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU kernels of a one-row prefill (new image) and of batch-1 decode steps, CUDA-graph runtimes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from smolbox.config import load_config
    from smolbox.runtime import OnnxVLM
    from smolbox.serve.engine import preload_cuda_libraries
    from smolbox.serve.kv_decoder import SlotVLM, load_runtime

    preload_cuda_libraries()
    folder = args.export or tiny_export(Path(tempfile.mkdtemp(prefix="kv-slots-")))
    defaults = load_config("tiny", env={}, dotenv=None).serve
    serve = lambda graph, dequantized=False, kernel=defaults.attention_kernel: load_config("tiny", overrides={  # noqa: E731
        "serve.max_batch_size": args.slots, "serve.cuda_graph": graph, "serve.prefill_dequantized": dequantized,
        "serve.attention_kernel": kernel}, env={}, dotenv=None).serve
    runtimes = {"published": OnnxVLM(folder, args.variant, providers=CUDA)}
    kinds = [("slots", False, False), ("slots+graph", True, False)]
    if args.prefill_dequantized:
        kinds.append(("slots+graph, dequantized prefill", True, True))
    kinds += [(f"slots+graph, attention_kernel={k}", True, False, k) for k in args.attention_kernels if k != defaults.attention_kernel]
    for name, *how in kinds:
        try:
            runtimes[name] = load_runtime(folder, args.variant, serve(*how), CUDA)
        except Exception as exc:  # noqa: BLE001 - a kernel choice the decoder cannot load with is a finding
            print(json.dumps({"runtime": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)
            continue
        assert isinstance(runtimes[name], SlotVLM), f"{name}: the decoder did not derive (see the log line)"
    a, b = prompts(folder, runtimes["published"].pixel_dtype)
    reference = {"a": alone(runtimes["published"], a, args.steps), "b": alone(runtimes["published"], b, args.steps // 2)}
    results, runs = [], {}
    for name, model in runtimes.items():
        runs[name], mismatches = join_and_leave(model, a, b, args.steps)
        agree = {k: float(np.mean(np.array(runs[name][k]) == np.array(reference[k]))) for k in reference}
        results.append({"runtime": name, "provider": model.provider, "cuda_graph": bool(getattr(model, "cuda_graph", False)),
                        "agreement_with_published_alone": agree, "greedy_vs_host_argmax_mismatches": mismatches,
                        "decode_tok_s_b1": decode_rate(model, a, 1, args.steps),
                        f"decode_tok_s_b{args.slots}": decode_rate(model, a, args.slots, args.steps),
                        f"decode_tok_s_b{args.slots}_logits_to_host": decode_rate(model, a, args.slots, args.steps, logits=True)})
        if getattr(model, "cuda_graph", False):
            results[-1]["graph_buckets"] = sorted(model._graphs)
            results[-1]["graph_capture_s"] = round(model.capture_s, 2)
        if isinstance(model, SlotVLM):
            results[-1]["kv_capacity_tokens"] = model.capacity
            try:  # a provider that refuses the batched first prompt must not hide the rest
                results[-1]["batched_prefill"] = batched_prefill(model, a, b, args.steps // 2)
                results[-1][f"prefill_ms_{args.slots}_rows_one_call"] = prefill_ms(model, a, args.slots)
            except Exception as exc:  # noqa: BLE001
                results[-1]["batched_prefill"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                model.release_all()
            model.batch_prefill = False
            results[-1][f"prefill_ms_{args.slots}_rows_call_per_row"] = prefill_ms(model, a, args.slots)
            model.batch_prefill = True
            results[-1]["prefill_ms_1_row"] = prefill_ms(model, a, 1)
            results[-1]["prefill_ms_new_lengths"] = prefill_ms_new_lengths(model, a)
            results[-1]["prompt_cache"] = prompt_reuse(model, a, args.steps // 2)
        if args.profile and getattr(model, "cuda_graph", False):
            from bench.serve_bench import kernel_profile

            results[-1]["kernels"] = kernel_profile(model, (a["input_ids"], a["attention_mask"], a["pixel_values"],
                                                            a["pixel_attention_mask"]), name)
        print(json.dumps(results[-1]), flush=True)
    graph = next(r for r in results if r["runtime"] == "slots+graph")
    graph_ok = runtimes["slots+graph"].cuda_graph and runs["slots+graph"] == runs["slots"] \
        and graph["greedy_vs_host_argmax_mismatches"] == 0 and graph["prompt_cache"]["tokens_equal_alone"]
    print(f"CUDA graph {'on' if runtimes['slots+graph'].cuda_graph else 'OFF'}; graph tokens "
          f"{'equal' if runs['slots+graph'] == runs['slots'] else 'DIFFER FROM'} the slot decoder without the graph")
    if args.json:
        args.json.write_text(json.dumps({"export": str(folder), "variant": args.variant, "slots": args.slots,
                                         "steps": args.steps, "results": results, "graph_ok": graph_ok}, indent=2))
    return 0 if graph_ok else 1


if __name__ == "__main__":
    sys.exit(main())
