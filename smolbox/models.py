"""Loading what the stages share: the base model as training quantizes it, processors, and the source an export or
an eval starts from (a training run, an adapter folder, or the base model alone).

train loads its base here, export merges into the base loaded here, eval scores the base and adapter loaded here:
so the weights an adapter was trained against are the weights it is merged into and scored with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from . import tiny
from .config import Config, QuantConfig
from .env import hf_hub_cache
from .manifest import read_json


class SourceError(ValueError):
    """A run, adapter or base that cannot be used; the message says what to pick instead."""


@dataclass
class Source:
    kind: str  # "run" | "adapter" | "base"
    model_id: str
    quant: QuantConfig
    adapter_dir: Path | None
    run_manifest: Path | None
    name: str


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
            raise SourceError(f"{path}: the training run has not completed (status {manifest.get('status')!r}); finish or resume it first")
        trained = Config.model_validate({k: v for k, v in manifest["config"].items() if k != "export"})
        return Source("run", trained.model.id, trained.quant, path / "adapter", path / "manifest.json", trained.run.name)
    if (path / "adapter_config.json").is_file():
        return Source("adapter", cfg.model.id, cfg.quant, path, None, path.name)
    raise SourceError(f"{path}: no training run (manifest.json) and no adapter (adapter_config.json) there; "
                      f"set export.source to a run folder, an adapter folder, or 'base'. {runs_in(path.parent)}")


def runs_in(folder: Path) -> str:
    """The runs that do exist beside a missing one, with their status, so the message says what to pick instead."""
    runs = sorted((p.name, (read_json(p / "manifest.json") or {}).get("status")) for p in folder.glob("*") if (p / "manifest.json").is_file())
    if not runs:
        return f"There are no runs in {folder}/."
    return f"Runs in {folder}/: " + ", ".join(f"{name} ({status})" for name, status in runs)


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
