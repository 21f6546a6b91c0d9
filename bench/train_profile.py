"""Where a smolbox training step spends its time: torch.profiler over two optimizer steps of a config on the
real-shape model (bench/real_shapes.py), after two warm-up steps. Prints the GPU time by kind of kernel (matrix
products, attention, NF4 dequantization, fused Triton kernels, other elementwise work), how much of the wall time
the GPU was busy and what the CPU did while it waited, then the top operators by self CUDA time and by self CPU time.

    python -m bench.real_shapes --out /tmp/rs
    python -m bench.train_profile --root /tmp/rs [--config default] [--micro-batch 16] [--workers 8] \\
        [--set train.compile=true ...] [--out prof.txt] [--json prof.json] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
import time
from pathlib import Path

# Kernel name fragments -> kind, first match wins (CUDA kernel names of torch 2.11 / cuBLAS / bitsandbytes / inductor).
KINDS = (
    ("attention", ("flash", "fmha", "attention", "cutlass_sm90_fmha", "efficient_attention")),
    ("nf4 dequantize", ("kdequantize", "dequantize")),
    ("matrix product", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "ampere_bf16", "wgrad", "dgrad")),
    ("fused (inductor)", ("triton_",)),
    ("copy / cast", ("copy", "memcpy", "to_copy", "cast")),
    ("reduction / norm", ("reduce", "norm", "softmax", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill", "index", "cat")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, fragments in KINDS if any(f in low for f in fragments)), "other")


def _is_gpu(event) -> bool:
    return str(event.device_type).endswith("CUDA")


def busy_intervals(events) -> list[tuple[float, float]]:
    """The union of the kernels' [start, end) intervals in seconds, sorted and disjoint (streams overlap)."""
    merged: list[list[float]] = []
    for start, stop in sorted((e.time_range.start / 1e6, (e.time_range.start + e.device_time_total) / 1e6)
                              for e in events if _is_gpu(e) and e.device_time_total > 0):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(start, stop) for start, stop in merged]


def kernel_summary(events, busy: list[tuple[float, float]], wall_s: float) -> dict:
    """GPU time by kernel kind over the profiled steps, and the GPU's busy share of their wall time."""
    by_kind: dict[str, float] = {}
    for event in events:
        if _is_gpu(event) and event.device_time_total > 0:
            by_kind[kind_of(event.name)] = by_kind.get(kind_of(event.name), 0.0) + event.device_time_total / 1e6
    busy_s = sum(stop - start for start, stop in busy)
    return {"wall_s": wall_s, "gpu_busy_s": busy_s, "gpu_busy_share": busy_s / wall_s if wall_s else None,
            "kernel_s_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "kernel_s_total": sum(by_kind.values())}


def idle_gaps(events, busy: list[tuple[float, float]], min_gap_s: float = 0.5e-3, top: int = 12) -> dict:
    """Where the GPU waits: its idle intervals longer than `min_gap_s` between the first and the last kernel, and
    the CPU operators that ran while it waited (seconds of overlap with the gaps, by name; nested operators each
    count), so a gap can be traced to what the training loop did on the CPU at that moment."""
    gaps = [(end, start) for (_, end), (start, _) in zip(busy, busy[1:]) if start - end > min_gap_s]
    overlap: dict[str, float] = {}
    starts = [g0 for g0, _ in gaps]
    for e in events:
        if _is_gpu(e):
            continue
        a, b = e.time_range.start / 1e6, e.time_range.end / 1e6
        i = max(0, bisect.bisect_right(starts, a) - 1)  # the gaps are sorted and disjoint
        shared = 0.0
        while i < len(gaps) and gaps[i][0] < b:
            shared += max(0.0, min(b, gaps[i][1]) - max(a, gaps[i][0]))
            i += 1
        if shared > 0:
            overlap[e.name] = overlap.get(e.name, 0.0) + shared
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:top]
    first = busy[0][0] if busy else 0.0
    return {"gap_count": len(gaps), "gap_s": sum(g1 - g0 for g0, g1 in gaps), "min_gap_s": min_gap_s,
            "longest_gaps": [{"at_s": g0 - first, "s": g1 - g0} for g0, g1 in longest],
            "cpu_ops_in_gaps_s": dict(sorted(overlap.items(), key=lambda kv: -kv[1])[:40])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--config", default="default")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (train.compile=true)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--trace", type=Path, default=None, help="also write the profile as a Chrome trace (.json)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from smolbox.config import load_config, parse_scalar
    from smolbox.train import train

    state = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class Profile(TrainerCallback):
        def on_step_end(self, a, s, control, **kw):
            if s.global_step == 2:  # steps 3 and 4 are profiled; 1 and 2 warm up (and compile, with train.compile)
                sync()
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif s.global_step == 4:
                sync()
                state["wall_s"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)

    overrides = {
        "model.id": str(args.root / "model"), "data.id": str(args.root / "data"), "data.train_split": "train",
        "data.eval_split": None, "data.num_proc": 1, "train.max_steps": 4, "train.logging_steps": 1,
        "train.save_steps": 100000, "train.global_batch_size": args.micro_batch,
        "train.per_device_train_batch_size": args.micro_batch, "train.dataloader_num_workers": args.workers,
        "run.min_free_disk_gb": 0, **{k: parse_scalar(v) for k, _, v in (pair.partition("=") for pair in args.set)}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, overrides={**overrides, "run.output_dir": tmp, "run.name": "profile"},
                          env={}, dotenv=None)
        train(cfg, callbacks=[Profile()])
    prof = state["prof"]
    events = list(prof.events())
    busy = busy_intervals(events)
    summary = {"config": args.config, "micro_batch": args.micro_batch, "workers": args.workers, "overrides": args.set,
               "steps_profiled": 2, "pairs_per_s": 2 * args.micro_batch / state["wall_s"],
               **kernel_summary(events, busy, state["wall_s"]), "idle": idle_gaps(events, busy)}
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    averages = prof.key_averages()
    lines = [f"2 optimizer steps of {args.micro_batch} pairs ({args.config} {' '.join(args.set)}, workers {args.workers}):"
             f" {state['wall_s']:.2f} s wall, {summary['pairs_per_s']:.2f} pairs/s, GPU busy {summary['gpu_busy_s']:.2f} s"
             f" ({100 * summary['gpu_busy_share']:.0f}%)", "| kernel kind | GPU s | share |", "|---|---|---|"]
    for kind, seconds in summary["kernel_s_by_kind"].items():
        lines.append(f"| {kind} | {seconds:.3f} | {100 * seconds / summary['kernel_s_total']:.1f}% |")
    idle = summary["idle"]
    lines.append(f"GPU idle in {idle['gap_count']} gaps over {1e3 * idle['min_gap_s']:.1f} ms: {idle['gap_s']:.3f} s; longest: "
                 + ", ".join(f"{1e3 * g['s']:.1f} ms at {g['at_s']:.2f} s" for g in idle["longest_gaps"]))
    lines += ["| CPU operator while the GPU waited | s |", "|---|---|"]
    lines += [f"| {name[:90]} | {seconds:.4f} |" for name, seconds in list(idle["cpu_ops_in_gaps_s"].items())[:25]]
    text = (averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80)
            + "\n" + averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=80)
            + "\n" + "\n".join(lines) + "\n")
    if args.out:
        args.out.write_text(text)
    if args.json:
        summary["top_cuda_ops"] = [{"name": e.key, "self_device_s": e.self_device_time_total / 1e6, "calls": e.count}
                                   for e in sorted(averages, key=lambda e: -e.self_device_time_total)[:60]]
        args.json.write_text(json.dumps(summary, indent=1))
    print(text[-7000:])


if __name__ == "__main__":
    main()
