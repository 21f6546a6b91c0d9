"""The export stage, step by step: merge, save the merged model, write the fp32 graphs, the other variants, the
transformers.js hints, parity, the manifest. Everything is written into a hidden temporary folder that is renamed
at the very end, so an interrupted export never leaves a folder that looks complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..config import Config
from ..env import git_commit, package_versions, resolve_device
from ..manifest import now, read_json, write_json_atomic
from ..onnx_layout import GRAPHS, graph_path
from ..sources import Source
from .errors import ExportError
from .folder import save_processor_files, write_client_config
from .graphs import FUSABLE, export_onnx, graph_kind
from .merge import merge
from .onnx_files import weight_bytes
from .parity import check_parity
from .plan import plan_export
from .quantize import build_variant

log = logging.getLogger("smolbox.export")


@dataclass
class ExportResult:
    folder: Path
    manifest: dict
    parity: dict


def export(cfg: Config) -> ExportResult:
    source, final = plan_export(cfg)
    name, out_root = final.name, final.parent
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
        check_disk(out_root, model, cfg.export.variants)
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
        manifest = export_manifest(cfg, source, work, parity, timings, device, kinds)
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


def export_manifest(cfg: Config, source: Source, folder: Path, parity: dict, timings: dict, device: str, kinds: dict[str, str]) -> dict:
    """manifest.json: every file (size, sha256), the source run, the settings, each variant's parity and weight bytes."""
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


def check_disk(out_root: Path, model, variants: list[str]) -> None:
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
