"""Facts about the machine and software that several stages need: device, attention backend, versions, git."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import subprocess
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

KEY_PACKAGES = [
    "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "tokenizers",
    "safetensors", "huggingface-hub", "pillow", "pydantic", "pyyaml", "numpy", "flash-attn",
    "onnx", "onnxruntime", "onnxruntime-gpu",
]


def resolve_device(cfg: Config) -> str:
    """'cuda' or 'cpu'. 'auto' picks CUDA when torch sees a GPU."""
    import torch

    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(cfg: Config, device: str) -> tuple[str, str]:
    """(implementation, reason). flash_attention_2 needs CUDA and the flash-attn package; otherwise sdpa."""
    wanted = cfg.model.attn_implementation
    can_flash = device == "cuda" and flash_attn_installed()
    if wanted in ("sdpa", "eager"):
        return wanted, f"{wanted} as configured"
    if wanted == "flash_attention_2" and not can_flash:
        why = "no CUDA device" if device != "cuda" else "flash-attn is not installed"
        return "sdpa", f"flash_attention_2 requested but {why}: falling back to sdpa"
    if can_flash:
        return "flash_attention_2", "flash-attn installed on CUDA"
    return "sdpa", "auto: flash-attn not available here, using sdpa"


def package_versions(names: list[str] | None = None) -> dict[str, str | None]:
    out = {}
    for name in names or KEY_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The source tree's commit, with '-dirty' when it has uncommitted changes; None outside git (e.g. in images)."""
    root = path or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def device_description(device: str) -> dict:
    import torch

    info = {"device": device, "platform": platform.platform(), "python": platform.python_version(), "cpu_count": cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
        )
    return info


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hf_hub_cache(cfg: Config) -> Path:
    """The hub cache folder: <run.hf_cache>/hub, else HF_HUB_CACHE, else <HF_HOME>/hub.

    Read from the environment now, because huggingface_hub.constants froze these at import time.
    """
    if cfg.run.hf_cache:
        return Path(cfg.run.hf_cache).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"
