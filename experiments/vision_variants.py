"""The vision encoder of an export in graph and kernel variants, on one GPU: which change cuts its time for one
13-tile image (the new-image half of the time to first token, issue #13)?

    python -m experiments.vision_variants --export /tmp/exp/base --variants fp16 q4f16 [--json out.json]

Graphs, each made from the export's own vision_encoder file by rewriting a few nodes (weights untouched):
- as exported: SkipLayerNorm -> MatMul q|k|v -> Split -> MultiHeadAttention (bias, additive mask) -> ...
- q|k|v apart: three MatMuls (or MatMulNBits: the 4-bit weights are quantized per output column, so the packed
  weight and its scales split by rows) instead of one and a Split (the Split copies [tiles x 729, 3 x 1152] a layer);
- no attention bias: MultiHeadAttention without the additive mask (smolbox.serve.derive.vision_without_mask; right
  only when every patch is real, as in the 13 full tiles of this image), which lets onnxruntime pick kernels that
  take no bias;
- both.
Sessions: the CUDA provider as the server makes it for the vision encoder, and with each `sdpa_kernel` choice
(onnxruntime's attention backends: 1 flash, 2 memory-efficient, 8 cuDNN flash, 16 unfused). Per row: median ms of a
run from host arrays (what the server's vision call does), the GPU's busy time in one run with its top kernels
(bench.serve_bench.gpu_kernels), and the largest difference of the features from the exported graph's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from smolbox.serve.derive import replace_nodes, vision_without_mask

KERNELS = {"default": None, "flash": "1", "efficient": "2", "cudnn": "8", "unfused": "16"}


def qkv_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each MatMul / MatMulNBits whose only reader is a three-way Split along the last axis replaced by three."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    nodes, added = [], []
    splits = {}
    for n in graph.node:
        if n.op_type == "Split" and len(n.output) == 3 and readers.get(n.input[0]) == 1 \
                and producer.get(n.input[0]) is not None and producer[n.input[0]].op_type in ("MatMul", "MatMulNBits"):
            splits[producer[n.input[0]].name] = n
    split_names = {s.name for s in splits.values()}
    for n in graph.node:
        if n.name in split_names:
            continue
        split = splits.get(n.name)
        if split is None:
            nodes.append(n)
            continue
        if n.op_type == "MatMul":
            weight = numpy_helper.to_array(inits[n.input[1]])
            parts = np.split(weight, 3, axis=1)
            for part, out, tag in zip(parts, split.output, "qkv"):
                name = f"{n.input[1]}.{tag}"
                added.append(numpy_helper.from_array(np.ascontiguousarray(part), name))
                nodes.append(helper.make_node("MatMul", [n.input[0], name], [out], name=f"{n.name}.{tag}"))
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            packed, scales = (numpy_helper.to_array(inits[n.input[i]]) for i in (1, 2))
            rows = attrs["N"] // 3
            for j, (out, tag) in enumerate(zip(split.output, "qkv")):
                names = []
                for source, array in ((n.input[1], packed), (n.input[2], scales)):
                    shape = (rows, *array.shape[1:]) if array.shape[0] == attrs["N"] else (-1,)  # scales may be flat
                    piece = array.reshape(attrs["N"], -1)[j * rows:(j + 1) * rows].reshape(shape)
                    names.append(f"{source}.{tag}")
                    added.append(numpy_helper.from_array(np.ascontiguousarray(piece), names[-1]))
                nodes.append(helper.make_node("MatMulNBits", [n.input[0], *names], [out], name=f"{n.name}.{tag}",
                                              domain="com.microsoft", **{**attrs, "N": rows}))
    graph.initializer.extend(added)
    replace_nodes(graph, nodes)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["fp16", "q4f16"])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime as ort

    from bench.serve_bench import QUESTION, gpu_kernels, image, median_ms
    from smolbox.export.onnx_files import save_onnx
    from smolbox.onnx_layout import graph_path
    from smolbox.preprocess import Preprocessor
    from smolbox.runtime import default_providers, session_options
    from smolbox.serve.engine import preload_cuda_libraries

    preload_cuda_libraries()
    cuda = "CUDAExecutionProvider" in default_providers()
    pre = Preprocessor(args.export)
    enc = pre.encode(pre.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]),
                     [image()])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            if not graph_path(args.export, "vision_encoder", variant).exists():
                print(f"{variant}: not in {args.export}", flush=True)
                continue
            source = onnx.load(str(graph_path(args.export, "vision_encoder", variant)))
            graphs = {"as exported": source, "q|k|v apart": qkv_apart(source), "no attention bias": vision_without_mask(source)}
            graphs["apart, no bias"] = vision_without_mask(graphs["q|k|v apart"])
            graphs = {kind: proto for kind, proto in graphs.items() if proto is not None}
            reference = None
            for kind, proto in graphs.items():
                path = Path(tmp) / f"{variant}_{len(rows)}.onnx"
                save_onnx(proto, path)
                for kernel in args.kernels if cuda else ["default"]:
                    options = {} if KERNELS[kernel] is None else {"sdpa_kernel": KERNELS[kernel]}
                    providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
                    try:
                        session = ort.InferenceSession(str(path), session_options(), providers=providers)
                        dtype = {"tensor(float16)": np.float16}.get(session.get_inputs()[0].type, np.float32)
                        feeds = {"pixel_values": enc.pixel_values.astype(dtype), "pixel_attention_mask": enc.pixel_attention_mask.astype(bool)}
                        for _ in range(3):
                            out = session.run(None, feeds)[0]
                    except Exception as exc:  # noqa: BLE001 - a kernel choice a graph cannot run is a finding
                        rows.append({"variant": variant, "graph": kind, "kernel": kernel, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    ms = median_ms(lambda: session.run(None, feeds), args.repeats, warmup=0)
                    reference = out if reference is None else reference
                    row = {"variant": variant, "graph": kind, "kernel": kernel, "nodes": len(proto.graph.node),
                           "median_ms": ms, "tiles": int(enc.pixel_values.shape[1]),
                           "max_abs_diff_vs_exported": float(np.abs(out.astype(np.float32) - reference.astype(np.float32)).max())}
                    if cuda:
                        row["gpu"] = gpu_kernels(lambda: session.run(None, feeds), 1, f"{variant} {kind} [{kernel}]", top=8)
                    rows.append(row)
                    del session
    print(f"{'variant':<7} {'graph':<18} {'kernel':<10} {'ms':>8} {'GPU ms':>8} {'max|diff|':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<7} {r['graph']:<18} {r['kernel']:<10} {r['error'][:60]}")
            continue
        print(f"{r['variant']:<7} {r['graph']:<18} {r['kernel']:<10} {r['median_ms']:>8} "
              f"{r.get('gpu', {}).get('gpu_ms_per_call', '-'):>8} {r['max_abs_diff_vs_exported']:>10.3g}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
