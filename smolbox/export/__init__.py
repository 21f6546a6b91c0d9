"""Export stage: merge the DoRA adapters, write the Hugging Face folder and its ONNX graphs, quantize, prove parity.

exports/<name>/
  config.json, generation_config.json, model.safetensors        the merged PyTorch model
  tokenizer.json, tokenizer_config.json (with chat_template), preprocessor_config.json (flat),
  processor_config.json (image_seq_len), chat_template.json
  onnx/vision_encoder{,_fp16,_quantized,_q4,_q4f16,_int8}.onnx (+ .onnx_data), embed_tokens*, decoder_model_merged*
  parity.json                                                    per variant: logit differences, greedy agreement
  manifest.json                                                  files (size, sha256), source run, timings, versions

  plan.py           the source and destination, refused before any work, without torch
  stage.py          export(): the steps in order, into a temporary folder renamed at the end; the manifest
  merge.py          the adapter merged into the base it trained against (smolbox.models loads it)
  graphs.py         the three graphs of one float variant, fused or traced
  fused_decoder.py  the Llama decoder with onnxruntime's fused operators  } written block by block with
  fused_vision.py   the SigLIP tower + connector, likewise                } graph_writer.py
  traced.py         the torch.onnx wrappers and tracing call
  onnx_files.py     saving graphs (external data), the float32 boundary of fp16 graphs, weight bytes
  quantize.py       q8 / q4 / q4f16 / int8 from the float graphs
  parity.py         every variant against the merged PyTorch model
  folder.py         the processor files and config.json hints clients read
"""

from .errors import ExportError
from .plan import plan_export

__all__ = ["ExportError", "ExportResult", "export", "plan_export"]


def __getattr__(name: str):
    # export() and ExportResult come from the stage, which imports torch, onnx and transformers: only when used, so
    # that plan_export() (the CLI's refusals) runs without them
    if name in ("export", "ExportResult"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
