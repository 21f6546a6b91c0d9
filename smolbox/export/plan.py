"""What an export is refused for before any work: a source that is not a completed run, an adapter or 'base', and a
destination that exists. It reads files only, so the package imports it without torch, onnx or transformers, and
`smolbox export` answers a wrong run name at once instead of after loading them."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..sources import Source, SourceError, resolve_source
from .errors import ExportError


def plan_export(cfg: Config) -> tuple[Source, Path]:
    """The source to export and the folder it goes to, or ExportError saying what to choose instead."""
    try:
        source = resolve_source(cfg)
    except SourceError as exc:
        raise ExportError(str(exc)) from exc
    final = Path(cfg.export.output_dir) / (cfg.export.name or source.name)
    if final.exists() and not cfg.export.overwrite:
        raise ExportError(f"{final} already exists: set export.overwrite=true or choose another export.name")
    return source, final
