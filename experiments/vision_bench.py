"""Vision encoder on onnxruntime: the torch.onnx-traced graph against smolbox.export.fused_vision's fused one, same model,
same 13-tile image, same card.

    python -m experiments.vision_bench --model exports/real --json vision_bench.json [--dtypes fp16 fp32] [--q4]

--model is a merged Hugging Face folder (an export folder works). Both graphs are built into a temporary folder
(fp16 traced from a half-precision copy, as smolbox.export does); --q4 also times the fused graph with 4-bit
MatMulNBits weights (what the q4f16 variant ships). Each row: median ms over --repeats runs after warm-up,
provider, max |difference| of the features against the traced graph of the same dtype, and onnxruntime's profile
of one run (top operators).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=["fp16", "fp32"])
    parser.add_argument("--q4", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bench.serve_bench import QUESTION, image
    from smolbox.export import fused_vision
    from smolbox.export.onnx_files import save_onnx
    from smolbox.export.quantize import weight_only
    from smolbox.export.traced import export_traced_vision
    from smolbox.serve.engine import preload_cuda_libraries

    preload_cuda_libraries()
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[[image()]], return_tensors="np")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in args.dtypes:
            dtype = {"fp16": np.float16, "fp32": np.float32}[dtype_name]
            half = model if dtype_name == "fp32" else AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float16).eval()
            graphs = {}
            pixels = torch.from_numpy(inputs["pixel_values"]).to(half.dtype)
            mask = torch.from_numpy(inputs["pixel_attention_mask"]).bool()
            started = time.perf_counter()
            graphs["traced"] = Path(tmp) / f"traced_{dtype_name}.onnx"
            export_traced_vision(half, pixels, mask, graphs["traced"])
            build_s = {"traced": time.perf_counter() - started}
            started = time.perf_counter()
            graphs["fused"] = Path(tmp) / f"fused_{dtype_name}.onnx"
            fused = fused_vision.build_vision_encoder(model, dtype)
            save_onnx(fused, graphs["fused"])
            build_s["fused"] = time.perf_counter() - started
            if args.q4:
                graphs["fused q4"] = Path(tmp) / f"fused_q4_{dtype_name}.onnx"
                save_onnx(weight_only(onnx.load(str(graphs["fused"])), 4, 32, "vision_encoder"), graphs["fused q4"])
            feeds = {"pixel_values": inputs["pixel_values"].astype(dtype), "pixel_attention_mask": inputs["pixel_attention_mask"].astype(bool)}
            reference = None
            for kind, path in graphs.items():
                options = ort.SessionOptions()
                options.log_severity_level = 3
                session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                for _ in range(3):
                    out = session.run(None, feeds)[0]
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    session.run(None, feeds)
                    times.append(time.perf_counter() - started)
                reference = out if reference is None else reference
                row = {"graph": kind, "dtype": dtype_name, "provider": session.get_providers()[0],
                       "nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
                       "median_ms": round(statistics.median(times) * 1000, 2), "tiles": int(inputs["pixel_values"].shape[1]),
                       "max_abs_diff_vs_traced": float(np.abs(out.astype(np.float32) - reference.astype(np.float32)).max()),
                       "build_s": round(build_s.get(kind, 0.0), 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            del half
    print(f"{'graph':<10} {'dtype':<5} {'provider':<22} {'nodes':>6} {'ms':>8} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['graph']:<10} {r['dtype']:<5} {r['provider']:<22} {r['nodes']:>6} {r['median_ms']:>8} {r['max_abs_diff_vs_traced']:>10.3g}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
