"""Export stage on the tiny bundle: merge, ONNX layout, generation parity with PyTorch, variants, safety."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from smolbox.config import load_config
from smolbox.export import ExportError, _check_disk, _parity_inputs, export, weight_bytes
from smolbox.runtime import GRAPHS, OnnxVLM, graph_path
from smolbox.train import train

VARIANTS = ["fp32", "fp16", "q8", "q4", "q4f16", "int8"]


def cfg_for(root: Path, **overrides):
    base = {"run.output_dir": str(root / "runs"), "run.name": "exp", "train.max_steps": 4, "train.save_steps": 4,
            "export.output_dir": str(root / "exports")}
    return load_config("tiny", overrides={**base, **overrides}, env={}, dotenv=None)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("export")
    train(cfg_for(root))
    return root


@pytest.fixture(scope="module")
def exported(root):
    return export(cfg_for(root))


@pytest.fixture(scope="module")
def exported_traced(root):
    """The same run with the torch.onnx-traced decoder and vision encoder (export.decoder/vision=traced), fp32 only."""
    return export(cfg_for(root, **{"export.decoder": "traced", "export.vision": "traced", "export.variants": ["fp32"],
                                   "export.name": "exp-traced"}))


@pytest.fixture(scope="module")
def merged(exported):
    model = AutoModelForImageTextToText.from_pretrained(exported.folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(exported.folder)


def test_folder_has_the_published_layout(exported):
    folder = exported.folder
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
    assert all(oct(p.stat().st_mode)[-3:] in ("644", "755") for p in folder.rglob("*"))


def test_graph_signatures(exported):
    def signature(path):
        model = onnx.load(str(path), load_external_data=False)
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        return ({i.name: (i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input},
                {o.name: dims(o) for o in model.graph.output}, model.ir_version)

    inputs, outputs, ir = signature(graph_path(exported.folder, "vision_encoder", "fp32"))
    assert inputs["pixel_values"] == (onnx.TensorProto.FLOAT, ["batch_size", "num_images", 3, "height", "width"])
    assert inputs["pixel_attention_mask"] == (onnx.TensorProto.BOOL, ["batch_size", "num_images", "height", "width"])
    assert ir <= 10
    inputs, outputs, _ = signature(graph_path(exported.folder, "decoder_model_merged", "fp32"))
    assert list(inputs)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == (onnx.TensorProto.INT64, ["batch_size", "total_sequence_length"])
    assert inputs["past_key_values.0.key"][1] == ["batch_size", 4, "past_sequence_length", 16]
    assert outputs["logits"][0:2] == ["batch_size", 1]  # the fused decoder returns the last position only
    assert outputs["present.1.value"] == ["batch_size", 4, "total_sequence_length", 16]
    assert exported.manifest["decoder"] == "fused" and exported.manifest["vision"] == "fused"


def test_every_variant_keeps_the_published_io_dtypes_and_config_hints(exported):
    """A suffix is a promise (docs/export.md): float32 at every graph boundary, bool image mask, int64 ids, and the KV
    cache in float16 only in _fp16 / _q4f16, which config.json's transformers.js_config.kv_cache_dtype says."""
    T = onnx.TensorProto
    full_config = json.loads((exported.folder / "config.json").read_text())
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
            path = graph_path(exported.folder, graph, variant)
            model = onnx.load(str(path), load_external_data=False)
            assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == inputs, (variant, graph)
            assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output} == outputs, (variant, graph)
            assert config["use_external_data_format"][path.name] == 1


def test_traced_decoder_keeps_the_full_sequence_layout(exported_traced):
    model = onnx.load(str(graph_path(exported_traced.folder, "decoder_model_merged", "fp32")), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert [d.dim_param for d in logits.type.tensor_type.shape.dim][:2] == ["batch_size", "sequence_length"]
    assert exported_traced.manifest["decoder"] == "traced" and exported_traced.manifest["vision"] == "traced"


def test_exported_processor_equals_the_trained_one(exported, root):
    original = AutoProcessor.from_pretrained(root / "runs" / "exp" / "adapter")
    reloaded = AutoProcessor.from_pretrained(exported.folder)
    for a, b in zip(_parity_inputs(original, 2), _parity_inputs(reloaded, 2)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def _left_padded_batch(processor):
    """Two prompts of different lengths and tile counts: left padding, and an all-zero padding image."""
    from PIL import Image

    tall = Image.new("RGB", (40, 90), (200, 30, 30))
    small = Image.new("RGB", (30, 30), (20, 200, 60))
    prompts = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square? Answer in one word."}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare?"}]}],
    ]
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    processor.image_processor.do_image_splitting = True
    return processor(text=texts, images=[[tall], [small, tall]], padding=True, padding_side="left", return_tensors="pt")


@pytest.mark.parametrize("decoder", ["fused", "traced"])
@pytest.mark.parametrize("batch", ["single", "left_padded_pair"])
def test_fp32_onnx_greedy_equals_pytorch_generate(request, merged, batch, decoder):
    exported = request.getfixturevalue("exported" if decoder == "fused" else "exported_traced")
    model, processor = merged
    inputs = _parity_inputs(processor, 1)[0] if batch == "single" else _left_padded_batch(processor)
    if batch != "single":
        assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
        assert (inputs["pixel_values"] == 0).flatten(2).all(-1).any(), "the batch must carry a padding image"
    new = 12
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:].numpy()
    runtime = OnnxVLM(exported.folder, "fp32", providers=["CPUExecutionProvider"])
    arrays = {k: v.numpy() for k, v in inputs.items()}
    ours = runtime.generate(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["pixel_attention_mask"], new)
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_loads_and_generates(exported, merged, variant):
    _, processor = merged
    inputs = {k: v.numpy() for k, v in _left_padded_batch(processor).items()}
    runtime = OnnxVLM(exported.folder, variant, providers=["CPUExecutionProvider"])
    tokens = runtime.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"], 6)
    vocab = json.loads((exported.folder / "config.json").read_text())["text_config"]["vocab_size"]
    assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 6
    assert ((tokens >= 0) & (tokens < vocab)).all()
    assert variant in exported.parity["variants"]


TRANSFORMERS_JS = Path(__file__).parent / "transformers_js"  # package.json (the pinned client), its lock, generate.mjs


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


def test_transformers_js_loads_and_runs_every_variant(exported, merged, tmp_path):
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
    request = {"model_dir": str(exported.folder), "dtypes": VARIANTS, "max_new_tokens": new, "messages": messages,
               "image": str(tmp_path / "image.png"), "inputs": arrays}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run([node, str(client / "generate.mjs"), str(tmp_path / "request.json")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    pinned = json.loads((TRANSFORMERS_JS / "package.json").read_text())["dependencies"]["@huggingface/transformers"]
    assert result["version"] == pinned
    assert result["prompt_input_ids"] == inputs["input_ids"][0].tolist()
    vocab = json.loads((exported.folder / "config.json").read_text())["text_config"]["vocab_size"]
    for variant in VARIANTS:
        theirs = result["dtypes"][variant]
        ours = OnnxVLM(exported.folder, variant, providers=["CPUExecutionProvider"]).generate(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"], new)[0].tolist()
        assert theirs["given_inputs"] == ours, variant
        assert 1 <= len(theirs["own_inputs"]) <= new and all(0 <= t < vocab for t in theirs["own_inputs"]), variant


def test_int4_weights_are_under_a_third_of_fp32(exported):
    variants = exported.manifest["variants"]
    q4, fp32 = variants["q4"]["weight_bytes"], variants["fp32"]["weight_bytes"]
    assert q4 == sum(weight_bytes(graph_path(exported.folder, g, "q4")) for g in GRAPHS)
    assert 0 < q4 < 0.35 * fp32, (q4, fp32)


def test_parity_report_and_manifest(exported, root):
    parity = json.loads((exported.folder / "parity.json").read_text())
    assert set(parity["variants"]) == set(VARIANTS)
    fp32 = parity["variants"]["fp32"]
    assert fp32["ok"] and fp32["greedy_agreement"] == 1.0 and fp32["max_logit_diff_prefill"] < 1e-4
    for entry in parity["variants"].values():
        assert {"max_logit_diff_prefill", "max_logit_diff_decode", "greedy_agreement", "ok"} <= set(entry)
    manifest = json.loads((exported.folder / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "run" and manifest["merge_into"] == "dequantized_nf4"
    run_manifest = root / "runs" / "exp" / "manifest.json"
    assert manifest["source"]["run"]["manifest"] == str(run_manifest.resolve())
    listed = {f["path"]: f for f in manifest["files"]}
    assert "onnx/decoder_model_merged_q4.onnx" in listed
    import hashlib

    sample = listed["onnx/decoder_model_merged.onnx_data"]
    assert sample["sha256"] == hashlib.sha256((exported.folder / sample["path"]).read_bytes()).hexdigest()
    assert manifest["parity_flagged"] == [v for v in VARIANTS if not parity["variants"][v]["ok"]]


def test_merge_into_dequantized_nf4_reproduces_the_trained_adapter_best(root):
    """The measurement behind export.merge_into's default (numbers: docs/export.md, bench/merge_fidelity.py)."""
    from bench.merge_fidelity import merge_errors

    errors = merge_errors(cfg_for(root))
    assert errors["dequantized_nf4"] < errors["full_precision"], errors


def test_existing_export_is_not_replaced_silently(exported, root):
    with pytest.raises(ExportError, match="already exists"):
        export(cfg_for(root))


def test_incomplete_run_is_refused(root):
    run = root / "runs" / "half"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(ExportError, match="has not completed"):
        export(cfg_for(root, **{"export.source": str(run), "export.name": "half"}))


def test_adapter_for_another_base_is_refused(root, tmp_path):
    from smolbox import tiny

    other = tiny.build_model()
    other.config.text_config.hidden_size = 128
    other.config.text_config.intermediate_size = 256
    bigger = type(other)(other.config)
    bigger.save_pretrained(tmp_path / "other-base")
    tiny.build_processor().save_pretrained(tmp_path / "other-base")
    cfg = cfg_for(root, **{"model.id": str(tmp_path / "other-base"), "export.source": str(root / "runs" / "exp" / "adapter"),
                           "export.name": "wrong", "export.merge_into": "full_precision"})
    with pytest.raises(ExportError, match="does not fit base model"):
        export(cfg)
    assert not (root / "exports" / "wrong").exists()


def test_full_disk_is_a_clear_error(root, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        with pytest.raises(ExportError, match="not enough disk"):
            export(cfg_for(root, **{"export.output_dir": str(small), "export.name": "full"}))
        assert not [p for p in small.iterdir()], "nothing may be left on the full disk"
    finally:
        subprocess.run(["umount", str(small)])


def test_disk_estimate_refuses_a_model_that_cannot_fit(tmp_path):
    huge = torch.nn.Linear(10**6, 10**6, bias=False, device="meta")  # 1e12 parameters, no memory
    with pytest.raises(ExportError, match="not enough disk"):
        _check_disk(tmp_path, huge, VARIANTS)


def test_sigkill_mid_export_leaves_no_complete_looking_folder(root):
    args = [sys.executable, "-m", "smolbox", "export", "--config", "tiny", "--env-file", "",
            "--run.output_dir", str(root / "runs"), "--run.name", "exp",
            "--export.output_dir", str(root / "exports"), "--export.name", "killed"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        partial = list((root / "exports").glob(".killed.partial-*/onnx/vision_encoder.onnx"))
        if partial:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "export ended before it could be killed"
    assert not (root / "exports" / "killed").exists()
    assert list((root / "exports").glob(".killed.partial-*")), "the partial folder is hidden, not final"

    done = subprocess.run(args + ["--export.variants", "[fp32]"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "exports" / "killed" / "manifest.json").is_file()
    assert not list((root / "exports").glob(".killed.partial-*")), "a new export clears the stale partial folder"


@pytest.mark.parametrize("decoder,on_cuda_path", [("fused", False), ("traced", False), ("fused", True)])
def test_rows_join_and_leave_a_running_batch(request, merged, decoder, on_cuda_path):
    """Continuous batching (smolbox.runtime select/merge): a request prefilled while another is decoding joins its
    batch, finished rows leave; every row's greedy tokens equal those of the request generated alone. on_cuda_path
    runs, on the CPU, what the runtime does on CUDA: I/O binding (embeddings, image features and cache as
    OrtValues in device memory, the features placed by a small graph) and prompts left-padded to a multiple of 16."""
    exported = request.getfixturevalue("exported" if decoder == "fused" else "exported_traced")
    _, processor = merged
    runtime = OnnxVLM(exported.folder, "fp32", providers=["CPUExecutionProvider"])
    if on_cuda_path:
        runtime.bind_io, runtime.prefill_multiple = True, 16
    single = {k: v.numpy() for k, v in _parity_inputs(processor, 1)[0].items()}
    pair = {k: v.numpy() for k, v in _left_padded_batch(processor).items()}

    def argmax_tokens(inputs, steps):
        """Greedy tokens past the end of the answer, as the rows below are decoded (the pretrained tiny model ends
        an answer in a few tokens; generate would pad after it)."""
        step = runtime.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        tokens = []
        for _ in range(steps):
            tokens.append(step.logits.argmax(-1).astype(np.int64))
            step = runtime.decode(step, tokens[-1])
        return np.stack(tokens, axis=1)

    alone = [argmax_tokens(single, 12)[0]]
    both = argmax_tokens(pair, 12)
    alone += [both[0], both[1]]

    produced = [[], [], []]
    step = runtime.prefill(single["input_ids"], single["attention_mask"], single["pixel_values"], single["pixel_attention_mask"])
    if on_cuda_path:
        assert single["input_ids"].shape[1] % 16 and step.attention_mask.shape[1] % 16 == 0, "the prompt was padded"
    owners = [0]  # which request each batch row belongs to
    for t in range(14):
        tokens = step.logits.argmax(-1).astype(np.int64)
        for row, owner in enumerate(owners):
            produced[owner].append(int(tokens[row]))
        if t == 3:  # the pair arrives: prefilled on its own (different length), then joins
            joined = runtime.prefill(pair["input_ids"], pair["attention_mask"], pair["pixel_values"], pair["pixel_attention_mask"])
            step = runtime.decode(step, tokens)
            for row, owner in enumerate([1, 2]):
                produced[owner].append(int(joined.logits[row].argmax()))
            step = runtime.merge(step, runtime.decode(joined, joined.logits.argmax(-1).astype(np.int64)))
            owners += [1, 2]
            continue
        if t == 7:  # request 0 leaves; its (longer) prompt's columns go with it
            keep = [1, 2]
            padding_only = int(np.argmax(step.attention_mask[keep].any(0)))  # leading columns no kept row uses
            length = step.attention_mask.shape[1]
            step, tokens, owners = runtime.select(step, keep), tokens[keep], [owners[i] for i in keep]
            assert step.attention_mask.shape[1] == length - padding_only and step.attention_mask.any(0)[0]
        step = runtime.decode(step, tokens)
    for owner, expected in enumerate(alone):
        n = min(len(produced[owner]), len(expected))
        np.testing.assert_array_equal(produced[owner][:n], expected[:n], err_msg=f"request {owner}")
        assert n >= 8
