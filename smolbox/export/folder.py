"""The Hugging Face files of an export folder that transformers 5 does not write the published way: the processor's
files in SmolVLM's layout, and config.json's hints for transformers.js."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from ..onnx_layout import GRAPHS, PAST, graph_path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_processor_files(processor, folder: Path) -> None:
    """Processor files in the published SmolVLM layout, which transformers 5's own save_pretrained does not write."""
    processor.save_pretrained(folder)
    image = processor.image_processor.to_dict()
    image.update(processor_class="Idefics3Processor", image_processor_type="Idefics3ImageProcessor")
    write_json(folder / "preprocessor_config.json", image)
    write_json(folder / "processor_config.json", {"image_seq_len": processor.image_seq_len, "processor_class": "Idefics3Processor"})
    template = processor.chat_template or processor.tokenizer.chat_template
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=template, processor_class="Idefics3Processor")
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    write_json(folder / "chat_template.json", {"chat_template": template})


def write_client_config(folder: Path, variants: list[str]) -> None:
    """config.json's "transformers.js_config", read from the written graphs: `kv_cache_dtype` per dtype whose decoder
    keeps a float16 cache (transformers.js 3.x sizes the empty first-step cache from it; 4.x reads the graph), and
    `use_external_data_format` for every graph with an .onnx_data file (browsers fetch only the files listed).
    Our variant names are transformers.js's dtype names (onnx_layout.VARIANT_SUFFIX). Hints a source config carried
    for other files are dropped: they would describe files that are not here."""
    cache, external = {}, {}
    for variant in variants:
        for graph in GRAPHS:
            path = graph_path(folder, graph, variant)
            if path.with_name(path.name + "_data").is_file():
                external[path.name] = 1
        decoder = onnx.load(str(graph_path(folder, "decoder_model_merged", variant)), load_external_data=False)
        past = next(i for i in decoder.graph.input if i.name.startswith(PAST))
        if past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            cache[variant] = "float16"
    config = json.loads((folder / "config.json").read_text())
    config["transformers.js_config"] = {"kv_cache_dtype": cache, "use_external_data_format": external}
    write_json(folder / "config.json", config)
