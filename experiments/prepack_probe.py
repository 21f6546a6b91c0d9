"""Probe: the same 4-bit weights in onnxruntime's CUDA fpA_intB layout (MatMulNBits weight_prepacked=1).

onnxruntime-gpu 1.31 carries TensorRT-LLM's weight-only GEMV/GEMM kernels for MatMulNBits ("fpA_intB"). They
take the weights either prepacked in the file (attribute weight_prepacked=1, the SM80 layout, block_size 32 with
scale-only symmetric quantization allowed) or prepacked by the session (session config ep.cuda.fpa_intb_gemm=1,
where the build supports it). This script rewrites an export's q4f16 graphs with every eligible MatMulNBits weight
repacked: the same 4-bit values in another byte order, so the model's function is unchanged, only the kernel that
reads them. The copy is a new export folder (all other files linked) that bench/serve_bench.py can load.

    python -m experiments.prepack_probe --export /tmp/exp/real --out /tmp/exp/real-prepacked [--variant q4f16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def prepack_graph(source: Path, target: Path) -> dict:
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.cuda_quantizer import _pack_weights_for_cuda_mixed_gemm

    from smolbox.export.onnx_files import save_onnx

    proto = onnx.load(str(source))
    initializers = {t.name: t for t in proto.graph.initializer}
    packed, skipped = 0, []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
        extra_inputs = [name for name in node.input[3:] if name]  # zero points, g_idx, bias: not in this layout
        if bits != 4 or block not in (32, 64, 128) or k % block or n % 64 or extra_inputs or node.input[1] not in initializers:
            skipped.append(f"{node.name} N={n} K={k}")
            continue
        weight = initializers[node.input[1]]
        raw = numpy_helper.to_array(weight)
        repacked = np.asarray(_pack_weights_for_cuda_mixed_gemm(raw.reshape(n, -1), n, k, bits, 80)).view(np.uint8)
        weight.CopyFrom(numpy_helper.from_array(repacked.reshape(raw.shape), weight.name))
        node.attribute.append(helper.make_attribute("weight_prepacked", 1))
        packed += 1
    save_onnx(proto, target)
    return {"graph": source.name, "prepacked": packed, "skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", default="q4f16")
    args = parser.parse_args()
    from smolbox.onnx_layout import graph_path

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx").mkdir(exist_ok=True)
    for item in args.export.iterdir():  # everything but the onnx folder is shared
        if item.name != "onnx" and not (args.out / item.name).exists():
            os.symlink(item.resolve(), args.out / item.name)
    for item in (args.export / "onnx").iterdir():
        if not (args.out / "onnx" / item.name).exists():
            os.symlink(item.resolve(), args.out / "onnx" / item.name)
    report = []
    for graph in ("decoder_model_merged", "vision_encoder"):
        source, target = graph_path(args.export, graph, args.variant), graph_path(args.out, graph, args.variant)
        for path in (target, target.with_name(target.name + "_data")):
            if path.is_symlink():
                path.unlink()
        started = time.perf_counter()
        row = prepack_graph(source, target)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({**row, "skipped": row["skipped"][:4], "skipped_count": len(row["skipped"])}), flush=True)
        report.append(row)
    (args.out / "prepack_probe.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
