"""Export at full size: time, peak memory and file sizes of each smolbox.export step on the real-shape model, and
the parity numbers, step by step so a short GPU lease can spread it over several calls.

    python -m bench.export_bench --model /tmp/rs/model --out /tmp/exp --phase all [--variants fp32 fp16 q8 q4 q4f16 int8]
    python -m bench.export_bench ... --phase graphs     # merge + save + fp32/fp16 graphs (fused decoder and vision)
    python -m bench.export_bench ... --phase variants   # q8 / q4 / int8 from the fp32 graphs, q4f16 from the fp16 ones
    python -m bench.export_bench ... --phase parity     # parity.json + manifest.json, folder renamed to <out>/real

Runs the functions smolbox.export.export() runs (smolbox/export/stage.py), in its order, with export.source=base (random weights: there is
no adapter to merge; a run folder works the same with --source). Results accumulate in <out>/bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from pathlib import Path


class PeakRSS:
    """Largest resident set size of this process while the block runs (sampled every 50 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _read(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _loop(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._read())

    def __enter__(self):
        self.peak = self._read()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


SAVE = []  # callbacks that write the results so far (a killed call keeps what was measured)


@contextlib.contextmanager
def measured(results: dict, step: str):
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with PeakRSS() as rss:
        yield
    entry = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(rss.peak / 2**30, 2)}
    if torch.cuda.is_available():
        entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results[step] = entry
    print(f"export_bench: {step}: {entry}", flush=True)
    for save in SAVE:
        save()


def _config(args):
    from smolbox.config import load_config

    return load_config("default", overrides={
        "model.id": str(args.model), "export.source": args.source, "export.output_dir": str(args.out),
        "export.name": "real", "export.variants": args.variants, "export.overwrite": True,
        "export.parity_prompts": args.parity_prompts, "export.parity_new_tokens": args.parity_new_tokens,
        "run.name": "real",
    }, env={}, dotenv=None)


def graphs(args, work: Path, results: dict) -> None:
    from smolbox.env import resolve_device
    from smolbox.export.folder import save_processor_files
    from smolbox.export.graphs import export_onnx
    from smolbox.export.merge import merge
    from smolbox.sources import resolve_source

    cfg = _config(args)
    device = resolve_device(cfg)
    source = resolve_source(cfg)
    with measured(results, "merge"):
        model, processor = merge(source, cfg.export.merge_into, device, cfg)
    with measured(results, "save merged model"):
        model.save_pretrained(work)
        save_processor_files(processor, work)
    with measured(results, "to fp32 on CPU"):
        cpu_model = model.float().cpu().eval() if device == "cuda" else model
    fused = {f"fused_{part}": kind == "fused" for part, kind in _kinds(cpu_model, cfg).items()}
    with measured(results, "onnx fp32"):
        export_onnx(cpu_model, processor, work / "onnx", **fused)
    if {"fp16", "q4f16"} & set(cfg.export.variants):
        with measured(results, "onnx fp16"):
            export_onnx(cpu_model, processor, work / "onnx", "fp16", **fused)


def _kinds(model, cfg) -> dict:
    from smolbox.export.graphs import FUSABLE, graph_kind

    return {part: graph_kind(model, part, getattr(cfg.export, part)) for part in FUSABLE}


def variants(args, work: Path, results: dict) -> None:
    from smolbox.export.quantize import build_variant

    cfg = _config(args)
    for variant in cfg.export.variants:
        if variant not in ("fp32", "fp16"):
            with measured(results, f"onnx {variant}"):
                build_variant(work / "onnx", variant, cfg.export.block_size)


def parity(args, work: Path, results: dict) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from smolbox.env import resolve_device
    from smolbox.export.parity import check_parity
    from smolbox.export.stage import export_manifest
    from smolbox.manifest import write_json_atomic
    from smolbox.sources import resolve_source

    cfg = _config(args)
    device = resolve_device(cfg)
    with measured(results, "parity"):
        model = AutoModelForImageTextToText.from_pretrained(work, dtype=torch.float32, attn_implementation="sdpa").eval()
        processor = AutoProcessor.from_pretrained(work)
        report = check_parity(model, processor, work, cfg, device)
    write_json_atomic(work / "parity.json", report)
    write_json_atomic(work / "manifest.json", export_manifest(cfg, resolve_source(cfg), work, report,
                                                             {k: v["seconds"] for k, v in results.items()}, device, _kinds(model, cfg)))
    return report


def sizes(work: Path) -> dict:
    from smolbox.onnx_layout import GRAPHS, VARIANT_SUFFIX

    out = {}
    for variant, suffix in VARIANT_SUFFIX.items():
        files = [work / "onnx" / f"{g}{suffix}.onnx" for g in GRAPHS]
        if all(f.is_file() for f in files):
            total = sum(f.stat().st_size + (f.with_name(f.name + "_data").stat().st_size if f.with_name(f.name + "_data").is_file() else 0) for f in files)
            out[variant] = round(total / 2**30, 3)
    merged = sum(p.stat().st_size for p in work.glob("*.safetensors"))
    out["merged_safetensors"] = round(merged / 2**30, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", default="base")
    parser.add_argument("--phase", choices=["all", "graphs", "variants", "parity"], default="all")
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "q8", "q4", "q4f16", "int8"])
    parser.add_argument("--parity-prompts", type=int, default=2)
    parser.add_argument("--parity-new-tokens", type=int, default=16)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.out / "real.work"
    work.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "bench.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"steps": {}}
    steps = state["steps"]
    SAVE.append(lambda: state_path.write_text(json.dumps(state, indent=2) + "\n"))
    try:
        if args.phase in ("all", "graphs"):
            graphs(args, work, steps)
        if args.phase in ("all", "variants"):
            variants(args, work, steps)
        if args.phase in ("all", "parity"):
            state["parity"] = parity(args, work, steps)
    finally:
        state["sizes_gib"] = sizes(work)
        state_path.write_text(json.dumps(state, indent=2) + "\n")
    print(f"{'step':<20} {'s':>7} {'RSS GiB':>8} {'GPU GiB':>8}")
    for step, e in steps.items():
        print(f"{step:<20} {e['seconds']:>7.1f} {e['peak_rss_gib']:>8.2f} {e.get('peak_gpu_gib', 0):>8.2f}")
    print("sizes GiB:", json.dumps(state["sizes_gib"]))
    for variant, p in (state.get("parity") or {}).get("variants", {}).items():
        print(f"parity {variant:<5} prefill {p['max_logit_diff_prefill']:.3g} decode {p['max_logit_diff_decode']:.3g} "
              f"agreement {p['greedy_agreement']:.2f} {p.get('provider', '')} {'ok' if p['ok'] else 'FLAGGED'}")


if __name__ == "__main__":
    main()
