"""Merge: the trained adapter folded into base weights, as one plain-float model with its processor."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText

from .. import tiny
from ..config import Config
from ..env import hf_hub_cache
from ..models import load_processor, load_trained_base
from ..sources import Source
from .errors import ExportError


def merge(source: Source, merge_into: str, device: str, cfg: Config):
    """The merged model (fp32 on CPU, bf16 on GPU) and its processor."""
    from peft import PeftModel

    model_path = tiny.resolve(source.model_id, "model")
    processor = load_processor(source.adapter_dir or model_path, cfg)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if source.adapter_dir is not None and merge_into == "dequantized_nf4":
        # DoRA normalizes by the norm of the base weight it sees: the NF4 weights it trained against reproduce
        # the trained function more closely than the original bf16 weights (docs/export.md).
        model = load_trained_base(source, cfg, device, "sdpa").dequantize().to(dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa", cache_dir=str(hf_hub_cache(cfg)),
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
