"""The export folder as clients read it: the published file layout, every variant's dtypes at the graph boundary and
config.json's hints, the processor files, and the pinned transformers.js client loading and running every variant."""

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoProcessor

from smolbox.export.parity import parity_inputs
from smolbox.onnx_layout import GRAPHS, graph_path
from smolbox.runtime import OnnxVLM

VARIANTS = ["fp32", "fp16", "q8", "q4", "q4f16", "int8"]


def test_folder_has_the_published_layout(tiny_export):
    folder = tiny_export.folder
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "processor_config.json", "parity.json", "manifest.json"):
        assert (folder / name).is_file(), name
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Idefics3Processor" and pre["do_image_splitting"] is True and "size" in pre
    assert json.loads((folder / "processor_config.json").read_text())["image_seq_len"] == 4
    assert "<image>" in json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    for variant in VARIANTS:
        for graph in GRAPHS:
            path = graph_path(folder, graph, variant)
            assert path.is_file() and path.with_name(path.name + "_data").is_file(), path
    assert not list(folder.parent.glob(".*partial*"))
    # Everything is world-readable: what export wrote, and what the demo's eval stage added since (eval.json, eval.png)
    assert (folder / "eval.json").is_file()
    assert all(oct(p.stat().st_mode)[-3:] in ("644", "755") for p in folder.rglob("*"))


def test_every_variant_keeps_the_published_io_dtypes_and_config_hints(tiny_export):
    """A suffix is a promise (docs/export.md): float32 at every graph boundary, bool image mask, int64 ids, and the KV
    cache in float16 only in _fp16 / _q4f16, which config.json's transformers.js_config.kv_cache_dtype says."""
    T = onnx.TensorProto
    full_config = json.loads((tiny_export.folder / "config.json").read_text())
    config, layers = full_config["transformers.js_config"], full_config["text_config"]["num_hidden_layers"]
    assert config["kv_cache_dtype"] == {"fp16": "float16", "q4f16": "float16"}
    for variant in VARIANTS:
        cache = T.FLOAT16 if variant in ("fp16", "q4f16") else T.FLOAT
        expected = {
            "vision_encoder": ({"pixel_values": T.FLOAT, "pixel_attention_mask": T.BOOL}, {"image_features": T.FLOAT}),
            "embed_tokens": ({"input_ids": T.INT64}, {"inputs_embeds": T.FLOAT}),
            "decoder_model_merged": ({"inputs_embeds": T.FLOAT, "attention_mask": T.INT64, "position_ids": T.INT64,
                                      **{f"past_key_values.{i}.{kv}": cache for i in range(layers) for kv in ("key", "value")}},
                                     {"logits": T.FLOAT, **{f"present.{i}.{kv}": cache for i in range(layers) for kv in ("key", "value")}}),
        }
        for graph, (inputs, outputs) in expected.items():
            path = graph_path(tiny_export.folder, graph, variant)
            model = onnx.load(str(path), load_external_data=False)
            assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == inputs, (variant, graph)
            assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output} == outputs, (variant, graph)
            assert config["use_external_data_format"][path.name] == 1


def test_exported_processor_equals_the_trained_one(tiny_export, tiny_run):
    original = AutoProcessor.from_pretrained(tiny_run.adapter_dir)
    reloaded = AutoProcessor.from_pretrained(tiny_export.folder)
    for a, b in zip(parity_inputs(original, 2), parity_inputs(reloaded, 2)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


TRANSFORMERS_JS = Path(__file__).parents[1] / "transformers_js"  # package.json (the pinned client), its lock, generate.mjs


def _transformers_js() -> tuple[str, Path]:
    """node and a folder with the pinned transformers.js installed, outside the checkout (SMOLBOX_NODE_CACHE, default
    ~/.cache/smolbox/node), keyed by the lock file's digest: `npm ci` runs once per lock, from the npm registry only
    (--ignore-scripts: onnxruntime-node's postinstall would fetch CUDA binaries from NuGet; its CPU build is in the
    package)."""
    import hashlib
    import shutil

    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed to check the export with transformers.js (install Node.js >= 20)")
    lock = (TRANSFORMERS_JS / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("SMOLBOX_NODE_CACHE") or Path.home() / ".cache" / "smolbox" / "node")
    folder = cache / f"transformers-js-{hashlib.sha256(lock).hexdigest()[:16]}"
    if not (folder / "node_modules" / ".smolbox-installed").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        for name in ("package.json", "package-lock.json"):
            shutil.copy(TRANSFORMERS_JS / name, partial / name)
        try:
            done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=partial, capture_output=True,
                                  text=True, timeout=900, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"})
            assert done.returncode == 0, f"npm ci of the pinned transformers.js failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            (partial / "node_modules" / ".smolbox-installed").touch()
            shutil.rmtree(folder, ignore_errors=True)  # an earlier install that did not finish
            with contextlib.suppress(OSError):  # another session may have finished the same install first
                partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # nothing left after the rename
    shutil.copy(TRANSFORMERS_JS / "generate.mjs", folder / "generate.mjs")  # resolves the package from that folder
    return node, folder


def test_transformers_js_loads_and_runs_every_variant(tiny_export, merged, tmp_path):
    """The client HF's published SmolVLM ONNX files are made for (transformers.js in Node, version pinned in
    tests/transformers_js) loads the export from its folder, offline, and generates greedily with every variant's
    dtype: from its own processor's inputs and from ours. Its prompt tokens equal our processor's, and from the same
    inputs its tokens equal smolbox's runtime's greedy tokens for every variant (the fp32 ones equal PyTorch's
    generate by test_fp32_onnx_greedy_equals_pytorch_generate)."""
    from PIL import Image

    node, client = _transformers_js()
    _, processor = merged
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}]
    Image.new("RGB", (40, 90), (200, 30, 30)).save(tmp_path / "image.png")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[Image.open(tmp_path / "image.png").convert("RGB")]], return_tensors="np")
    arrays = {}
    for name, dtype in (("input_ids", "int64"), ("attention_mask", "int64"), ("pixel_values", "float32"), ("pixel_attention_mask", "bool")):
        array = np.ascontiguousarray(inputs[name], dtype=np.uint8 if dtype == "bool" else dtype)
        (tmp_path / f"{name}.bin").write_bytes(array.tobytes())
        arrays[name] = {"file": str(tmp_path / f"{name}.bin"), "dtype": dtype, "dims": list(array.shape)}
    new = 8
    request = {"model_dir": str(tiny_export.folder), "dtypes": VARIANTS, "max_new_tokens": new, "messages": messages,
               "image": str(tmp_path / "image.png"), "inputs": arrays}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run([node, str(client / "generate.mjs"), str(tmp_path / "request.json")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    pinned = json.loads((TRANSFORMERS_JS / "package.json").read_text())["dependencies"]["@huggingface/transformers"]
    assert result["version"] == pinned
    assert result["prompt_input_ids"] == inputs["input_ids"][0].tolist()
    vocab = json.loads((tiny_export.folder / "config.json").read_text())["text_config"]["vocab_size"]
    for variant in VARIANTS:
        theirs = result["dtypes"][variant]
        ours = OnnxVLM(tiny_export.folder, variant, providers=["CPUExecutionProvider"]).generate(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"], new)[0].tolist()
        assert theirs["given_inputs"] == ours, variant
        assert 1 <= len(theirs["own_inputs"]) <= new and all(0 <= t < vocab for t in theirs["own_inputs"]), variant
