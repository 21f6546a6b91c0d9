"""Loading what the stages share: the base model as training quantizes it, and processors (the source an export or
an eval starts from is smolbox.sources).

train loads its base here, export merges into the base loaded here, eval scores the base and adapter loaded here:
so the weights an adapter was trained against are the weights it is merged into and scored with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from . import tiny
from .config import Config
from .env import hf_hub_cache
from .sources import Source


def load_processor(path: str | Path, cfg: Config, revision: str | None = None):
    return AutoProcessor.from_pretrained(path, revision=revision, cache_dir=str(hf_hub_cache(cfg)))


def load_base(cfg: Config, device: str, attn: str, model_path: str, gpu: int = 0):
    """The base model as the recipe loads it: NF4 with double quantization and the configured compute dtype, on
    `device` (CUDA: GPU number `gpu`, the process's own under torchrun)."""
    kwargs = dict(
        dtype=getattr(torch, cfg.model.dtype), attn_implementation=attn,
        revision=cfg.model.revision, cache_dir=str(hf_hub_cache(cfg)),
    )
    if cfg.quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.quant.compute_dtype),
        )
        # bitsandbytes quantizes while loading, onto the device given here
        kwargs["device_map"] = {"": gpu if device == "cuda" else "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    if device == "cpu":
        _keep_cpu_4bit_layout_trainable(model)
    return model


def load_trained_base(source: Source, cfg: Config, device: str, attn: str):
    """The base model exactly as `source`'s run trained on it: that run's model id and quantization."""
    trained = cfg.model_copy(update={"quant": source.quant, "model": cfg.model.model_copy(update={"id": source.model_id})})
    return load_base(trained, device, attn, tiny.resolve(source.model_id, "model"))


def _keep_cpu_4bit_layout_trainable(model) -> None:
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first no-grad eval forward; training on the
    # repacked layout then fails ("a view of a leaf Variable ... in-place"). Keep the trainable layout.
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
