"""Export stage: merge the DoRA adapters, write the Hugging Face folder and its ONNX graphs, quantize, prove parity.

exports/<name>/
  config.json, generation_config.json, model.safetensors        the merged PyTorch model
  tokenizer.json, tokenizer_config.json (with chat_template), preprocessor_config.json (flat),
  processor_config.json (image_seq_len), chat_template.json
  onnx/vision_encoder{,_fp16,_quantized,_q4,_q4f16,_int8}.onnx (+ .onnx_data), embed_tokens*, decoder_model_merged*
  parity.json                                                    per variant: logit differences, greedy agreement
  manifest.json                                                  files (size, sha256), source run, timings, versions

Everything is written into a hidden temporary folder that is renamed at the very end, so an interrupted export
never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from PIL import Image
from torch.export import Dim
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache

from . import __version__, onnx_decoder, onnx_vision, tiny
from .config import Config, QuantConfig
from .env import git_commit, hf_hub_cache, package_versions, resolve_device
from .manifest import now, read_json, write_json_atomic
from .runtime import GRAPHS, OnnxVLM, graph_path, variant_providers

log = logging.getLogger("smolbox.export")

ONNX_IR_VERSION = 10  # onnxruntime <= 1.31 loads IR <= 13; 10 is what current exporters write
PARITY_SEED = 1234


class ExportError(RuntimeError):
    """An export that cannot go on; the message says what to do."""


@dataclass
class Source:
    kind: str  # "run" | "adapter" | "base"
    model_id: str
    quant: QuantConfig
    adapter_dir: Path | None
    run_manifest: Path | None
    name: str


@dataclass
class ExportResult:
    folder: Path
    manifest: dict
    parity: dict


def export(cfg: Config) -> ExportResult:
    source = resolve_source(cfg)
    name = cfg.export.name or source.name
    out_root = Path(cfg.export.output_dir)
    final = out_root / name
    if final.exists() and not cfg.export.overwrite:
        raise ExportError(f"{final} already exists: set export.overwrite=true or choose another export.name")
    out_root.mkdir(parents=True, exist_ok=True)
    for stale in out_root.glob(f".{name}.partial-*"):  # left by an interrupted export
        shutil.rmtree(stale, ignore_errors=True)
    device = resolve_device(cfg)
    timings: dict[str, float] = {}
    steps = ["merge", "save merged model", "onnx fp32", *[f"onnx {v}" for v in cfg.export.variants if v != "fp32"], "parity"]
    progress = _Progress(steps, timings)

    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_root))
    try:
        with progress("merge"):
            model, processor = merge(source, cfg.export.merge_into, device, cfg)
        _check_disk(out_root, model, cfg.export.variants)
        with progress("save merged model"):
            model.save_pretrained(work)
            save_processor_files(processor, work)
        cpu_model = model.float().cpu().eval() if device == "cuda" else model
        kinds = {part: graph_kind(cpu_model, part, getattr(cfg.export, part)) for part in FUSABLE}
        fused = {f"fused_{part}": kind == "fused" for part, kind in kinds.items()}  # export_onnx's keywords
        with progress("onnx fp32"):
            export_onnx(cpu_model, processor, work / "onnx", **fused)
        variants = cfg.export.variants
        for variant in variants:
            if variant == "fp32":
                continue
            with progress(f"onnx {variant}"):
                if variant == "fp16" or (variant == "q4f16" and "fp16" not in variants):
                    export_onnx(cpu_model, processor, work / "onnx", "fp16", **fused)
                if variant != "fp16":
                    build_variant(work / "onnx", variant, cfg.export.block_size)
                if variant == "q4f16" and "fp16" not in variants:  # only its source was asked for
                    for graph in GRAPHS:
                        for path in (graph_path(work, graph, "fp16"), graph_path(work, graph, "fp16").with_suffix(".onnx_data")):
                            path.unlink(missing_ok=True)
        write_client_config(work, variants)
        with progress("parity"):
            parity = check_parity(cpu_model, processor, work, cfg, device)
        write_json_atomic(work / "parity.json", parity)
        manifest = _manifest(cfg, source, work, parity, timings, device, kinds)
        write_json_atomic(work / "manifest.json", manifest)
        _make_world_readable(work)  # a serving container reads it as a non-root user
        if final.exists():  # overwrite: swap in the new folder, then drop the old one
            old = out_root / f".{name}.old-{int(time.time())}"
            final.rename(old)
            work.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(final)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"disk full while exporting into {out_root}: free space there, or set export.output_dir") from exc
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("export: done: %s", final)
    return ExportResult(final, manifest, parity)


# ---- source and merge ---------------------------------------------------------------------------------------


def resolve_source(cfg: Config, source: str | None = None) -> Source:
    """A training run (its manifest says which base and quantization it trained on), an adapter folder, or 'base':
    `source` (smolbox eval's eval.run), else export.source; null = <run.output_dir>/<run.name>."""
    source = source or cfg.export.source
    if source == "base":
        return Source("base", cfg.model.id, cfg.quant, None, None, cfg.run.name)
    path = Path(source or Path(cfg.run.output_dir) / cfg.run.name)
    manifest = read_json(path / "manifest.json")
    if manifest is not None:
        if manifest.get("status") != "completed" or not (path / "adapter" / "adapter_config.json").is_file():
            raise ExportError(f"{path}: the training run has not completed (status {manifest.get('status')!r}); finish or resume it first")
        trained = Config.model_validate({k: v for k, v in manifest["config"].items() if k != "export"})
        return Source("run", trained.model.id, trained.quant, path / "adapter", path / "manifest.json", trained.run.name)
    if (path / "adapter_config.json").is_file():
        return Source("adapter", cfg.model.id, cfg.quant, path, None, path.name)
    raise ExportError(f"{path}: no training run (manifest.json) and no adapter (adapter_config.json) there; "
                      f"set export.source to a run folder, an adapter folder, or 'base'. {_runs_in(path.parent)}")


def _runs_in(folder: Path) -> str:
    """The runs that do exist beside a missing one, with their status, so the message says what to pick instead."""
    runs = sorted((p.name, (read_json(p / "manifest.json") or {}).get("status")) for p in folder.glob("*") if (p / "manifest.json").is_file())
    if not runs:
        return f"There are no runs in {folder}/."
    return f"Runs in {folder}/: " + ", ".join(f"{name} ({status})" for name, status in runs)


def merge(source: Source, merge_into: str, device: str, cfg: Config):
    """The merged model (fp32 on CPU, bf16 on GPU) and its processor."""
    from peft import PeftModel

    model_path = tiny.resolve(source.model_id, "model")
    cache_dir = str(hf_hub_cache(cfg))
    processor = AutoProcessor.from_pretrained(source.adapter_dir or model_path, cache_dir=cache_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if source.adapter_dir is not None and merge_into == "dequantized_nf4":
        # DoRA normalizes by the norm of the base weight it sees: the NF4 weights it trained against reproduce
        # the trained function more closely than the original bf16 weights (docs/export.md).
        from .train import load_model

        quant_cfg = cfg.model_copy(update={"quant": source.quant, "model": cfg.model.model_copy(update={"id": source.model_id})})
        model = load_model(quant_cfg, device, "sdpa", model_path)
        model = model.dequantize().to(dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa", cache_dir=cache_dir,
            device_map={"": 0 if device == "cuda" else "cpu"},
        )
    if source.adapter_dir is not None:
        try:
            model = PeftModel.from_pretrained(model, str(source.adapter_dir)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ExportError(f"adapter {source.adapter_dir} does not fit base model {source.model_id}: {str(exc)[:500]}") from exc
    if hasattr(model.config, "quantization_config"):  # the merged weights are plain floats
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval(), processor


def save_processor_files(processor, folder: Path) -> None:
    """Processor files in the published SmolVLM layout, which transformers 5's own save_pretrained does not write."""
    processor.save_pretrained(folder)
    image = processor.image_processor.to_dict()
    image.update(processor_class="Idefics3Processor", image_processor_type="Idefics3ImageProcessor")
    _write_json(folder / "preprocessor_config.json", image)
    _write_json(folder / "processor_config.json", {"image_seq_len": processor.image_seq_len, "processor_class": "Idefics3Processor"})
    template = processor.chat_template or processor.tokenizer.chat_template
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=template, processor_class="Idefics3Processor")
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    _write_json(folder / "chat_template.json", {"chat_template": template})


def write_client_config(folder: Path, variants: list[str]) -> None:
    """config.json's "transformers.js_config", read from the written graphs: `kv_cache_dtype` per dtype whose decoder
    keeps a float16 cache (transformers.js 3.x sizes the empty first-step cache from it; 4.x reads the graph), and
    `use_external_data_format` for every graph with an .onnx_data file (browsers fetch only the files listed).
    Our variant names are transformers.js's dtype names (runtime.VARIANT_SUFFIX). Hints a source config carried
    for other files are dropped: they would describe files that are not here."""
    cache, external = {}, {}
    for variant in variants:
        for graph in GRAPHS:
            path = graph_path(folder, graph, variant)
            if path.with_name(path.name + "_data").is_file():
                external[path.name] = 1
        decoder = onnx.load(str(graph_path(folder, "decoder_model_merged", variant)), load_external_data=False)
        past = next(i for i in decoder.graph.input if i.name.startswith("past_key_values."))
        if past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            cache[variant] = "float16"
    config = json.loads((folder / "config.json").read_text())
    config["transformers.js_config"] = {"kv_cache_dtype": cache, "use_external_data_format": external}
    _write_json(folder / "config.json", config)


# ---- ONNX graphs ----------------------------------------------------------------------------------------------


class VisionEncoder(torch.nn.Module):
    """pixel_values [B, N, 3, H, W] + pixel_attention_mask bool [B, N, H, W] -> features of the real images.

    All-zero images are the processor's padding (rows with fewer tiles); they are dropped here, so the output
    flattens to exactly one row per <image> token.
    """

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector
        self.patch = model.config.vision_config.patch_size

    def forward(self, pixel_values, pixel_attention_mask):
        b, n, c, h, w = pixel_values.shape
        pixels = pixel_values.reshape(b * n, c, h, w)
        mask = pixel_attention_mask.reshape(b * n, h, w)
        real = (pixels != 0).flatten(1).any(1)
        pixels, mask = pixels[real], mask[real]
        if isinstance(pixels.shape[0], torch.SymInt):
            # Tracing only: the number of real images is data-dependent, and some torch versions (2.11) then
            # cannot decide how attention masks broadcast ("Could not guard on data-dependent expression
            # Eq(u0, 1)"). Both operands share that size, so either branch computes the same thing.
            torch._check(pixels.shape[0] != 1)
        p = self.patch
        # Patches tile the image from the top-left; a remainder narrower than a patch (384 px = 27 x 14 + 6 in
        # SmolVLM) belongs to no patch, as in transformers' unfold and the patch convolution's stride.
        rows, cols = h // p, w // p
        patch_mask = mask[:, : rows * p, : cols * p].reshape(mask.shape[0], rows, p, cols, p).any(4).any(2)
        features = self.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
        return self.connector(features)


class TokenEmbeddings(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.text_model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderWithCache(torch.nn.Module):
    """inputs_embeds + attention_mask + position_ids + past (key, value per layer) -> logits + present."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model.model.text_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.text_config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.text_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(out.last_hidden_state), *present)


# Graphs that can be written with onnxruntime's fused operators instead of traced: export.<part> picks.
FUSABLE = {"decoder": onnx_decoder, "vision": onnx_vision}


def graph_kind(model, part: str, choice: str) -> str:
    """'fused' (FUSABLE[part]) or 'traced' (torch.onnx) for export.decoder / export.vision = auto / fused / traced."""
    reason = FUSABLE[part].unsupported_reason(model)
    if choice == "fused" and reason:
        raise ExportError(f"export.{part}=fused does not support this model ({reason}): set export.{part}=traced or auto")
    if choice == "auto" and reason:
        log.info("export: %s traced with torch.onnx (the fused %s graph does not support %s)", part, part, reason)
    return "traced" if choice == "traced" or reason else "fused"


def export_onnx(model, processor, onnx_dir: Path, variant: str = "fp32", fused_decoder: bool = False,
                fused_vision: bool = False) -> None:
    """The three graphs of one float variant, with dynamic batch, image count, image size and sequence dimensions.

    fp16 is traced from a half-precision copy of the model: onnxruntime's fp32->fp16 graph converter writes
    duplicate Cast names on torch.onnx's graphs, which onnxruntime then rejects. With `fused_decoder` the decoder
    is written by smolbox.onnx_decoder instead of traced, with `fused_vision` the vision encoder by
    smolbox.onnx_vision.
    """
    onnx_dir.mkdir(parents=True, exist_ok=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[variant]
    if variant != "fp32":
        model = copy.deepcopy(model).to(dtype)
    save = lambda proto, graph: save_onnx(published_io(proto), graph_path(onnx_dir.parent, graph, variant))  # noqa: E731
    inputs = _parity_inputs(processor, 1)[0]
    text = model.config.text_config
    layers, hidden = text.num_hidden_layers, text.hidden_size
    kv_heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    float_type = np.float16 if variant == "fp16" else np.float32  # of the fused graphs

    if fused_vision:
        save(onnx_vision.build_vision_encoder(model, float_type), "vision_encoder")
    else:
        save(traced_vision(model, inputs["pixel_values"].to(dtype), inputs["pixel_attention_mask"].bool()), "vision_encoder")

    input_ids = inputs["input_ids"]
    save(_export(TokenEmbeddings(model), (input_ids,), ["input_ids"], ["inputs_embeds"],
                 {"input_ids": {0: "batch_size", 1: "sequence_length"}}), "embed_tokens")

    if fused_decoder:
        save(onnx_decoder.build_decoder(model, float_type), "decoder_model_merged")
        return
    # Trace with a non-empty past (torch.export specializes sizes 0 and 1); the graph also runs with past length 0.
    batch, new, past_len = 2, 3, 2
    embeds = torch.randn(batch, new, hidden, dtype=dtype)
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new).expand(batch, new)
    past = tuple(torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers))
    names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    seq = Dim("sequence_length")
    bsz = Dim("batch_size")
    save(_export(DecoderWithCache(model), (embeds, mask, positions, past),
                 ["inputs_embeds", "attention_mask", "position_ids", *[f"past_key_values.{n}" for n in names]],
                 ["logits", *[f"present.{n}" for n in names]],
                 {"inputs_embeds": {0: bsz, 1: seq}, "attention_mask": {0: bsz, 1: Dim("total_sequence_length")},
                  "position_ids": {0: bsz, 1: seq},
                  "past": tuple({0: bsz, 2: Dim("past_sequence_length", min=0)} for _ in names)},
                 rename_outputs={f"present.{n}": {2: "total_sequence_length"} for n in names}), "decoder_model_merged")


def traced_vision(model, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> onnx.ModelProto:
    """The vision encoder traced by torch.onnx (export.vision=traced), with dynamic batch, image count and size."""
    return _export(VisionEncoder(model), (pixel_values, pixel_mask), ["pixel_values", "pixel_attention_mask"], ["image_features"],
                   {"pixel_values": {0: "batch_size", 1: "num_images", 3: "height", 4: "width"},
                    "pixel_attention_mask": {0: "batch_size", 1: "num_images", 2: "height", 3: "width"}})


def export_traced_vision(model, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, path: Path) -> None:
    save_onnx(traced_vision(model, pixel_values, pixel_mask), path)


# The KV cache keeps the graph's own precision (float16 in _fp16 / _q4f16: kv_cache_dtype in config.json).
KV_CACHE_PREFIXES = ("past_key_values.", "present.")


def published_io(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 at the graph boundary except the KV cache, as in HF's published SmolVLM `_fp16` / `_q4f16` files.

    transformers.js feeds its processor's float32 `pixel_values` to every variant, copies float32 `image_features`
    into the embeddings without a cast and takes the KV cache dtype from config.json (`kv_cache_dtype`) or the
    graph's declared inputs: a float16 graph gets Cast nodes on its float16 inputs and outputs, past_key_values.* /
    present.* excepted. A float32 graph is returned unchanged. The proto is changed in place.
    """
    graph, half = proto.graph, onnx.TensorProto.FLOAT16
    renames, head, tail = {}, [], []
    for value in graph.input:
        tensor = value.type.tensor_type
        if tensor.elem_type == half and not value.name.startswith(KV_CACHE_PREFIXES):
            inner = renames[value.name] = f"{value.name}.float16"
            head.append(onnx.helper.make_node("Cast", [value.name], [inner], name=f"{value.name}.to_float16", to=half))
            tensor.elem_type = onnx.TensorProto.FLOAT
    for value in graph.output:
        tensor = value.type.tensor_type
        if tensor.elem_type == half and not value.name.startswith(KV_CACHE_PREFIXES):
            inner = renames[value.name] = f"{value.name}.float16"
            tail.append(onnx.helper.make_node("Cast", [inner], [value.name], name=f"{value.name}.to_float32", to=onnx.TensorProto.FLOAT))
            tensor.elem_type = onnx.TensorProto.FLOAT
    if not renames:
        return proto
    _rename_tensors(graph, renames)
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _rename_tensors(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Every use and definition of the renamed tensors inside the graph (and subgraphs reading them), not the
    graph's own inputs and outputs."""
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _rename_tensors(sub, renames)
    for info in graph.value_info:
        info.name = renames.get(info.name, info.name)


@contextlib.contextmanager
def _exportable_bucketize():
    """torch.bucketize as a comparison and a sum while tracing.

    Idefics3's vision embeddings bucketize patch coordinates; torch.onnx lowers bucketize to a GatherND that
    onnxruntime rejects once a coordinate reaches the last bucket ("invalid index found, index = 26" with
    SmolVLM's 27 patches per side; the tiny model's 4 never do). Counting boundaries is the same function.
    """
    original = torch.bucketize

    def bucketize(input, boundaries, *, out_int32=False, right=False, **kwargs):
        if kwargs or not isinstance(input, torch.Tensor) or boundaries.dim() != 1:
            return original(input, boundaries, out_int32=out_int32, right=right, **kwargs)
        passed = input.unsqueeze(-1) >= boundaries if right else input.unsqueeze(-1) > boundaries
        return passed.sum(-1).to(torch.int32 if out_int32 else torch.int64)

    torch.bucketize = bucketize
    try:
        yield
    finally:
        torch.bucketize = original


def _export(module, args, input_names, output_names, dynamic_shapes, rename_outputs=None) -> onnx.ModelProto:
    with torch.no_grad(), _quiet_exporter(), _exportable_bucketize():
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    proto = program.model_proto
    for output in proto.graph.output:
        for axis, name in (rename_outputs or {}).get(output.name, {}).items():
            output.type.tensor_type.shape.dim[axis].dim_param = name
    return proto


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Weights over 1 KiB go to <file>.onnx_data beside the graph, as in the published SmolVLM ONNX folders."""
    proto.ir_version = min(proto.ir_version, ONNX_IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def build_variant(onnx_dir: Path, variant: str, block_size: int) -> None:
    """Derive one quantized variant of all three graphs from the fp32 ones (q4f16: from the fp16 ones)."""
    for graph in GRAPHS:
        source = graph_path(onnx_dir.parent, graph, "fp16" if variant == "q4f16" else "fp32")
        target = graph_path(onnx_dir.parent, graph, variant)
        if variant in ("q4", "q4f16", "q8"):
            save_onnx(_weight_only(onnx.load(str(source)), 8 if variant == "q8" else 4, block_size, graph), target)
        elif variant == "int8":
            _dynamic_int8(source, target, graph)
        else:
            raise ExportError(f"unknown export variant {variant!r}")


def _weight_only(proto: onnx.ModelProto, bits: int, block_size: int, graph: str) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The embedding table is a Gather: at 4 bits quantize it block-wise too (GatherBlockQuantized, 4-bit only).
    if graph == "embed_tokens" and bits != 4:
        return proto
    ops = ("Gather",) if graph == "embed_tokens" else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=bits, op_types_to_quantize=ops, quant_axes=(("Gather", 1), ("MatMul", 0)),
    )
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True, algo_config=config,
                                     op_types_to_quantize=ops, quant_axes=(("Gather", 1), ("MatMul", 0)))
    with _quiet_exporter():
        quantizer.process()
    return quantizer.model.model


def _dynamic_int8(source: Path, target: Path, graph: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if graph == "embed_tokens":  # no MatMul to quantize; the published _int8 sets carry the table as it is
        save_onnx(onnx.load(str(source)), target)
        return
    # quantize_dynamic re-runs ONNX shape inference, which disagrees with the exporter's recorded value_info on
    # the vision graph's bucketize boundaries (Range: 27 inferred, 26 recorded for SmolVLM's 27 patches per side)
    # and fails. Quantize a copy without the recorded intermediate shapes; it sits beside the source so its
    # external weights resolve without being copied.
    graph_only = onnx.load(str(source), load_external_data=False)
    del graph_only.graph.value_info[:]
    stripped = source.with_name(f".{source.stem}.int8-source.onnx")
    onnx.save_model(graph_only, str(stripped))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / target.name
            with _quiet_exporter():
                # DefaultTensorType: shape inference stops at onnxruntime's own operators (the fused graphs').
                quantize_dynamic(str(stripped), str(scratch), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 use_external_data_format=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            save_onnx(onnx.load(str(scratch)), target)
    finally:
        stripped.unlink(missing_ok=True)


# ---- parity ---------------------------------------------------------------------------------------------------


def _parity_inputs(processor, count: int) -> list[dict]:
    """Fixed image prompts (drawn shapes, as in the tiny preference set), processed one per batch."""
    rows = tiny.preference_rows(count, seed=PARITY_SEED)
    batches = []
    for row in rows:
        images = [Image.open(io.BytesIO(img["bytes"])).convert("RGB") for img in row["images"]]
        text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True)
        batches.append(processor(text=[text], images=[images], return_tensors="pt"))
    return batches


def check_parity(model, processor, folder: Path, cfg: Config, device: str = "cpu") -> dict:
    """Per variant, against the merged PyTorch model: logit differences at prefill and at one cached decode step,
    and greedy agreement over parity_new_tokens. fp32 beyond its bound is a bug and fails the export.

    On a GPU machine the fp32 reference runs on the GPU (TF32 off) and the ONNX variants on onnxruntime's CUDA
    provider when it is installed (fp32 with TF32 off; int8 has no CUDA kernels and stays on the CPU): a
    full-size model's parity then takes seconds instead of many CPU minutes.
    """
    e = cfg.export
    on_gpu = device == "cuda" and torch.cuda.is_available()
    if on_gpu:
        model = model.to("cuda")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    references = []
    try:
        with torch.no_grad():
            for inputs in _parity_inputs(processor, e.parity_prompts):
                inputs = inputs.to(model.device)
                prefill = model(**inputs).logits[:, -1].float().cpu().numpy()
                generated = model.generate(**inputs, max_new_tokens=e.parity_new_tokens, do_sample=False)
                new_tokens = generated[:, inputs["input_ids"].shape[1]:].cpu().numpy()
                extended = {**inputs, "input_ids": generated[:, : inputs["input_ids"].shape[1] + 1],
                            "attention_mask": torch.ones_like(generated[:, : inputs["input_ids"].shape[1] + 1])}
                decode = model(**extended).logits[:, -1].float().cpu().numpy()
                references.append(({k: v.cpu() for k, v in inputs.items()}, prefill, decode, new_tokens))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    report = {"prompts": e.parity_prompts, "new_tokens": e.parity_new_tokens,
              "reference": f"merged PyTorch model, fp32, {'CUDA' if on_gpu else 'CPU'}", "variants": {}}
    for variant in e.variants:
        providers = variant_providers(variant, {"use_tf32": 0}) if on_gpu else ["CPUExecutionProvider"]
        runtime = OnnxVLM(folder, variant, providers=providers)
        prefill_diff = decode_diff = 0.0
        matches = total = 0
        for inputs, prefill, decode, new_tokens in references:
            arrays = {k: v.numpy() for k, v in inputs.items()}
            step = runtime.prefill(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["pixel_attention_mask"])
            prefill_diff = max(prefill_diff, float(np.abs(step.logits - prefill).max()))
            step = runtime.decode(step, new_tokens[:, 0])  # feed the reference's first token to both
            decode_diff = max(decode_diff, float(np.abs(step.logits - decode).max()))
            ours = runtime.generate(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["pixel_attention_mask"], e.parity_new_tokens)
            n = min(ours.shape[1], new_tokens.shape[1])
            matches += int((ours[:, :n] == new_tokens[:, :n]).sum())
            total += new_tokens.shape[1]
        agreement = matches / total
        entry = {"max_logit_diff_prefill": prefill_diff, "max_logit_diff_decode": decode_diff, "greedy_agreement": agreement,
                 "provider": runtime.provider}
        if variant == "fp32":
            entry["ok"] = max(prefill_diff, decode_diff) <= e.fp32_max_logit_diff and agreement == 1.0
            if not entry["ok"]:
                raise ExportError(f"fp32 ONNX parity broken (logit diff {max(prefill_diff, decode_diff):.3g}, greedy agreement "
                                  f"{agreement:.2f}): this is a bug in the exporter, please report it")
        else:
            entry["ok"] = max(prefill_diff, decode_diff) <= e.quantized_max_logit_diff and agreement >= e.quantized_min_agreement
            if not entry["ok"]:
                log.warning("!!! export: %s parity beyond thresholds: logit diff %.3g (max %.3g), greedy agreement %.2f "
                            "(min %.2f); it is marked in manifest.json", variant, max(prefill_diff, decode_diff),
                            e.quantized_max_logit_diff, agreement, e.quantized_min_agreement)
        report["variants"][variant] = entry
        log.info("export: parity %-5s prefill %.3g decode %.3g agreement %.2f %s", variant, prefill_diff, decode_diff,
                 agreement, "ok" if entry["ok"] else "FLAGGED")
    return report


# ---- bookkeeping ----------------------------------------------------------------------------------------------


def _manifest(cfg: Config, source: Source, folder: Path, parity: dict, timings: dict, device: str, kinds: dict[str, str]) -> dict:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files.append({"path": str(path.relative_to(folder)), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    run = None
    if source.run_manifest is not None:
        run = {"manifest": str(source.run_manifest.resolve()), "sha256": _sha256(source.run_manifest),
               "config_fingerprint": read_json(source.run_manifest).get("config_fingerprint")}
    return {
        "smolbox_version": __version__, "created": now(), "git_commit": git_commit(), "versions": package_versions(),
        "source": {"kind": source.kind, "model_id": source.model_id,
                   "adapter": str(source.adapter_dir.resolve()) if source.adapter_dir else None, "run": run},
        "merge_into": cfg.export.merge_into if source.adapter_dir else None, "device": device,
        "export_config": cfg.export.model_dump(mode="json"), **kinds,  # "decoder", "vision": fused / traced
        "variants": {v: {"files": [str(graph_path(Path("."), g, v)) for g in GRAPHS], "parity_ok": parity["variants"][v]["ok"],
                         "weight_bytes": sum(weight_bytes(graph_path(folder, g, v)) for g in GRAPHS)}
                     for v in cfg.export.variants},
        "parity_flagged": [v for v, p in parity["variants"].items() if not p["ok"]],
        "timings_s": timings, "files": files,
    }


def weight_bytes(path: Path) -> int:
    """Bytes of all initializers of a graph, inside the .onnx file or in its external data."""
    total = 0
    for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        total += int(external["length"]) if "length" in external else len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


def _check_disk(out_root: Path, model, variants: list[str]) -> None:
    """Refuse up front when the export cannot fit: about 4 bytes per parameter per fp32-sized copy."""
    params = sum(p.numel() for p in model.parameters())
    copies = 2 + 0.5 * len([v for v in variants if v == "fp16"]) + 0.4 * len([v for v in variants if v in ("q8", "q4", "q4f16", "int8")])
    needed = int(params * 4 * copies)
    free = shutil.disk_usage(out_root).free
    if free < needed:
        raise ExportError(f"not enough disk in {out_root}: the export needs about {needed / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free; free space or set export.output_dir elsewhere")


def _make_world_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx and the ORT quantizers print a line per pass; keep the console to our progress lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxruntime", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class _Progress:
    """`with progress("step"):` logs '[i/n] step ...' and its duration."""

    def __init__(self, steps: list[str], timings: dict[str, float]):
        self.steps, self.timings = steps, timings

    @contextlib.contextmanager
    def __call__(self, step: str):
        index = self.steps.index(step) + 1
        log.info("export: [%d/%d] %s ...", index, len(self.steps), step)
        started = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - started, 2)
        log.info("export: [%d/%d] %s done in %.1f s", index, len(self.steps), step, self.timings[step])
