"""The source an export or an eval starts from: a training run (its manifest says which base and quantization it
trained on), an adapter folder, or the base model alone. Only files are read here, nothing heavier than the config
is imported, so a wrong source is refused before torch loads (`smolbox export` of a run that does not exist answers
at once, with the runs that do)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config, QuantConfig
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
