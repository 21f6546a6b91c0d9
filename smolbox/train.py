"""Train stage: DPO with TRL on a 4-bit NF4 SmolVLM with DoRA adapters, read top to bottom.

runs/<name>/
  adapter/            the trained DoRA adapter (safetensors) and the processor
  checkpoints/        checkpoint-<step>/ every save_steps, the last save_total_limit kept
  metrics.jsonl       one JSON line per log/eval event
  manifest.json       versions, git commit, resolved config + hash, data fingerprints, device, times, status
  train.log           the log lines printed to the console
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, TrainerCallback, set_seed

from . import __version__, tiny
from .config import Config
from .data import load_preference_data
from .env import device_description, git_commit, hf_hub_cache, package_versions, resolve_attention, resolve_device
from .manifest import image_labels, now, read_json, write_json_atomic

log = logging.getLogger("smolbox.train")

COMPLETE_MARKER = "SMOLBOX_COMPLETE"  # written after a checkpoint is fully on disk


class RunError(RuntimeError):
    """A run that must not start (wrong folder, unusable checkpoint); the message says what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    manifest: dict
    global_step: int
    resumed_from: str | None
    plot: Path | None = None  # training curves (PNG), when matplotlib is installed


def train(cfg: Config) -> TrainResult:
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume_from = _plan_resume(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to_file(run_dir / "train.log")

    manifest = _start_manifest(cfg, run_dir, resume_from)
    try:
        result = _run(cfg, run_dir, resume_from, manifest)
    except BaseException as exc:  # KeyboardInterrupt too: the manifest must say how the run ended
        manifest.update(status="failed", end=now(), error=f"{type(exc).__name__}: {exc}")
        write_json_atomic(run_dir / "manifest.json", manifest)
        raise
    return result


def _run(cfg: Config, run_dir: Path, resume_from: str | None, manifest: dict) -> TrainResult:
    device = resolve_device(cfg)
    attn, attn_reason = resolve_attention(cfg, device)
    log.info("device: %s; attention: %s (%s)", device, attn, attn_reason)
    manifest.update(device=device_description(device), attention={"implementation": attn, "reason": attn_reason})
    set_seed(cfg.train.seed)
    if device == "cuda":
        # PyTorch's cuDNN attention backend rebuilds its execution plan on the CPU for every new shape (~6 ms a
        # forward, ~10 ms a backward call; sequence lengths vary per batch), which made training CPU-bound.
        # Flash / memory-efficient attention compute the same function without that cost (docs/benchmarks.md).
        torch.backends.cuda.enable_cudnn_sdp(False)

    model_path = tiny.resolve(cfg.model.id, "model")
    processor = AutoProcessor.from_pretrained(model_path, revision=cfg.model.revision, cache_dir=str(hf_hub_cache(cfg)))

    train_split = load_preference_data(cfg.data, cfg.data.train_split)
    eval_split = load_preference_data(cfg.data, cfg.data.eval_split) if cfg.data.eval_split else None
    manifest["data"] = {name: _split_facts(s) for name, s in (("train", train_split), ("eval", eval_split)) if s}
    write_json_atomic(run_dir / "manifest.json", manifest)

    model = load_model(cfg, device, attn, model_path)
    trainer = _build_trainer(cfg, run_dir, device, model, processor, train_split.dataset, eval_split and eval_split.dataset)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from:
        _truncate_metrics(metrics_path, _checkpoint_step(Path(resume_from)))
        log.info("resuming from %s", resume_from)
    trainer.add_callback(RunCallback(metrics_path, _pairs_per_step(cfg), device))
    if cfg.train.precompute_ref_logps:
        seconds, first_batch_s = trainer.precompute_reference_logps()
        manifest["ref_logps_precompute_s"] = round(seconds, 1)
        manifest["ref_logps_first_batch_s"] = round(first_batch_s, 1)
        manifest["ref_logps_pairs"] = len(trainer.train_dataset)
        log.info("train: reference log-probs of %d pairs precomputed in %.1f s", len(trainer.train_dataset), seconds)

    output = trainer.train(resume_from_checkpoint=resume_from)

    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # peft saves adapter_model.safetensors + adapter_config.json
    processor.save_pretrained(str(adapter_dir))
    manifest.update(
        status="completed", end=now(), global_step=trainer.state.global_step,
        train_metrics={k: v for k, v in output.metrics.items() if isinstance(v, (int, float))},
        peak_memory_gb=_peak_memory_gb(device),
    )
    write_json_atomic(run_dir / "manifest.json", manifest)
    log.info("done: %d optimizer steps, adapter in %s", trainer.state.global_step, adapter_dir)
    from .plots import plot_training

    plot = plot_training(run_dir)
    return TrainResult(run_dir, adapter_dir, manifest, trainer.state.global_step, resume_from, plot)


def load_model(cfg: Config, device: str, attn: str, model_path: str):
    """The base model as the recipe loads it: NF4 with double quantization and the configured compute dtype."""
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
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    if device == "cpu":
        _keep_cpu_4bit_layout_trainable(model)
    return model


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


def _build_trainer(cfg: Config, run_dir: Path, device: str, model, processor, train_ds, eval_ds):
    from peft import LoraConfig
    from trl import DPOConfig

    from .dora import use_fused_dora
    from .trainer import SmolboxDPOTrainer

    t = cfg.train
    args = DPOConfig(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.learning_rate, beta=t.beta,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=t.max_length,
        bf16=t.bf16, use_cpu=device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=t.eval_steps or t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        seed=t.seed, data_seed=t.seed,
        prediction_loss_only=True, report_to=list(t.report_to) or "none", disable_tqdm=False,
    )
    peft_config = LoraConfig(
        r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
        use_dora=cfg.adapter.use_dora,
        init_lora_weights="gaussian" if cfg.adapter.init_lora_weights == "gaussian" else True,
        target_modules=list(cfg.adapter.target_modules), task_type="CAUSAL_LM",
    )
    trainer = SmolboxDPOTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=processor, peft_config=peft_config,
    )
    if cfg.adapter.use_dora and cfg.adapter.fused_dora:
        log.info("train: fused DoRA forward on %d layers (smolbox.dora)", use_fused_dora(trainer.model))
    return trainer


# ---- resume -------------------------------------------------------------------------------------------------


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that were fully written, oldest first (a SIGKILL mid-save leaves one without the marker)."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _plan_resume(cfg: Config, run_dir: Path) -> str | None:
    previous = read_json(run_dir / "manifest.json")
    if previous is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir} exists, is not empty and has no manifest.json: choose another run.name or empty it")
        return None
    if previous.get("config_fingerprint") != cfg.fingerprint():
        raise RunError(
            f"{run_dir} belongs to a different config (fingerprint {previous.get('config_fingerprint')} there, "
            f"{cfg.fingerprint()} now); refusing to mix runs. Choose another run.name or delete that folder."
        )
    if cfg.run.resume == "never":
        raise RunError(f"{run_dir} already holds a run and run.resume=never: choose another run.name or set run.resume=auto")
    if cfg.run.resume == "auto":
        checkpoints = complete_checkpoints(run_dir)
        return str(checkpoints[-1]) if checkpoints else None
    explicit = Path(cfg.run.resume)
    if not (explicit / COMPLETE_MARKER).is_file():
        raise RunError(f"run.resume={explicit} is not a complete checkpoint (no {COMPLETE_MARKER} in it)")
    return str(explicit)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: those steps are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


# ---- manifest & metrics -------------------------------------------------------------------------------------


def _start_manifest(cfg: Config, run_dir: Path, resume_from: str | None) -> dict:
    previous = read_json(run_dir / "manifest.json") or {}
    attempts = previous.get("attempts", [])
    if previous:
        attempts.append({k: previous.get(k) for k in ("start", "end", "status", "error", "resumed_from")})
    manifest = {
        "smolbox_version": __version__,
        "command": sys.argv,
        "run_name": cfg.run.name,
        "status": "running",
        "start": now(),
        "end": None,
        "resumed_from": resume_from,
        "attempts": attempts,
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "seed": cfg.train.seed,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "image": image_labels(),
    }
    write_json_atomic(run_dir / "manifest.json", manifest)
    return manifest


def _split_facts(split) -> dict:
    return {"source": split.source, "rows_in": split.rows_in, "rows": len(split.dataset), "skipped": split.skipped, "fingerprint": split.fingerprint}


def _pairs_per_step(cfg: Config) -> int:
    world = max(1, torch.cuda.device_count()) if cfg.run.device != "cpu" and torch.cuda.is_available() else 1
    return cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * world


def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux reports KiB


def _log_to_file(path: Path) -> None:
    root = logging.getLogger("smolbox")
    root.setLevel(logging.INFO)
    root.propagate = False  # some libraries configure the root logger; print our lines once
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        root.addHandler(console)
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)


class RunCallback(TrainerCallback):
    """Writes metrics.jsonl (with pairs/s and peak memory) and marks checkpoints complete."""

    def __init__(self, metrics_path: Path, pairs_per_step: int, device: str):
        self.metrics_path = metrics_path
        self.pairs_per_step = pairs_per_step
        self.device = device
        self.last_time = time.perf_counter()
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kw):
        self.last_time, self.last_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        record = {"step": state.global_step, "epoch": state.epoch, "time": now()}
        if "loss" in logs:  # a training log: throughput since the previous one
            elapsed = time.perf_counter() - self.last_time
            steps = state.global_step - self.last_step
            if steps > 0 and elapsed > 0:
                record["pairs_per_s"] = round(steps * self.pairs_per_step / elapsed, 4)
            self.last_time, self.last_step = time.perf_counter(), state.global_step
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and not math.isnan(v)})
        record["peak_memory_gb"] = _peak_memory_gb(self.device)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def on_save(self, args, state, control, **kw):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
