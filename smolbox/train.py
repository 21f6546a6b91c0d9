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

from . import __version__, distributed, tiny
from .config import LENGTH_KEYS, Config, TrainConfig, get_dotted
from .data import load_preference_data
from .env import device_description, git_commit, hf_hub_cache, package_versions, resolve_attention, resolve_device
from .manifest import image_labels, now, read_json, write_json_atomic
from .progress import use_console_progress

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


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's pairs are split: processes x micro-batch x accumulation = global_batch_size."""

    processes: int
    micro_batch: int
    accumulation: int

    @property
    def pairs_per_step(self) -> int:
        return self.processes * self.micro_batch * self.accumulation


def plan_batches(t: TrainConfig, processes: int) -> BatchPlan:
    """The micro-batch and accumulation for `processes` processes that keep train.global_batch_size pairs a step.

    Each process takes global / processes pairs a step, in micro-batches of the largest divisor of that up to
    per_device_train_batch_size. The data loader gives step k the pairs k*G .. (k+1)*G-1 of the epoch's order
    whatever the split, so the optimizer sees the same batches on any number of GPUs."""
    if t.global_batch_size % processes:
        fits = sorted({n for n in range(1, 9) if t.global_batch_size % n == 0})
        raise RunError(
            f"train.global_batch_size={t.global_batch_size} pairs cannot be split evenly over {processes} processes: "
            f"use {', '.join(map(str, fits))} GPUs, or a global batch that is a multiple of {processes} "
            f"(e.g. {t.global_batch_size // processes * processes or processes} or {(t.global_batch_size // processes + 1) * processes})")
    per_process = t.global_batch_size // processes
    micro = max(d for d in range(1, min(per_process, t.per_device_train_batch_size) + 1) if per_process % d == 0)
    return BatchPlan(processes, micro, per_process // micro)


def train(cfg: Config, callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Train, or resume, the run <run.output_dir>/<run.name>; `callbacks` are added to the Trainer (benchmarks).

    Under torchrun / accelerate launch every process calls this; rank 0 writes the run folder."""
    device = resolve_device(cfg)
    world = distributed.start(device, cfg.train.ddp_timeout_s)
    plan = plan_batches(cfg.train, world.size)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume = _plan_resume(cfg, run_dir)
    if resume.finished is not None:
        # Nothing is written: not the log, not the manifest (print, since the run's log file is not opened).
        print(f"smolbox: {run_dir} is complete ({resume.finished.get('global_step')} optimizer steps); nothing to do. "
              "To train it further, raise train.max_steps or train.num_train_epochs.", file=sys.stderr)
        return TrainResult(run_dir, run_dir / "adapter", resume.finished, resume.finished.get("global_step", 0), None)
    resume_from = resume.checkpoint
    distributed.barrier()  # every process has read the run folder before rank 0 writes to it
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _log_to_file(run_dir / "train.log")
    else:
        logging.getLogger("smolbox").setLevel(logging.WARNING)  # one voice: rank 0's

    manifest = _start_manifest(cfg, run_dir, resume_from) if world.is_main else {}
    if resume.note:
        log.info("%s", resume.note)
    try:
        result = _run(cfg, run_dir, device, plan, resume_from, manifest, callbacks or [])
    except BaseException as exc:  # KeyboardInterrupt too: the manifest must say how the run ended
        if world.is_main:
            manifest.update(status="failed", end=now(), error=f"{type(exc).__name__}: {exc}")
            write_json_atomic(run_dir / "manifest.json", manifest)
        raise
    return result


def _run(cfg: Config, run_dir: Path, device: str, plan: BatchPlan, resume_from: str | None, manifest: dict,
         callbacks: list) -> TrainResult:
    world = distributed.world()
    attn, attn_reason = resolve_attention(cfg, device)
    log.info("device: %s; attention: %s (%s)", device, attn, attn_reason)
    log.info("batch: %d pairs a step = %d process(es) x micro-batch %d x accumulation %d",
             plan.pairs_per_step, plan.processes, plan.micro_batch, plan.accumulation)
    jobs = distributed.describe(device)
    manifest.update(device=device_description(device), attention={"implementation": attn, "reason": attn_reason},
                    distributed=jobs, batch={"global": plan.pairs_per_step, "micro_batch": plan.micro_batch,
                                             "accumulation": plan.accumulation, "processes": plan.processes})
    set_seed(cfg.train.seed)
    if device == "cuda":
        # PyTorch's cuDNN attention backend rebuilds its execution plan on the CPU for every new shape (~6 ms a
        # forward, ~10 ms a backward call; sequence lengths vary per batch), which made training CPU-bound.
        # Flash / memory-efficient attention compute the same function without that cost (docs/benchmarks.md).
        torch.backends.cuda.enable_cudnn_sdp(False)

    with distributed.local_main_first():  # one process per host builds the tiny bundle and the data caches
        model_path = tiny.resolve(cfg.model.id, "model")
        processor = AutoProcessor.from_pretrained(model_path, revision=cfg.model.revision, cache_dir=str(hf_hub_cache(cfg)))
        train_split = load_preference_data(cfg.data, cfg.data.train_split)
        eval_split = load_preference_data(cfg.data, cfg.data.eval_split) if cfg.data.eval_split else None
    manifest["data"] = {name: _split_facts(s) for name, s in (("train", train_split), ("eval", eval_split)) if s}
    if world.is_main:
        write_json_atomic(run_dir / "manifest.json", manifest)

    model = load_model(cfg, device, attn, model_path)
    trainer = build_trainer(cfg, run_dir, device, model, processor, train_split.dataset, eval_split and eval_split.dataset, plan)
    use_console_progress(trainer)  # one compact metrics line per logging step; bars only on a terminal
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from:
        if world.is_main:
            _truncate_metrics(metrics_path, _checkpoint_step(Path(resume_from)))
        log.info("resuming from %s", resume_from)
    trainer.add_callback(RunCallback(metrics_path, plan.pairs_per_step, device))
    for callback in callbacks:
        trainer.add_callback(callback)
    if cfg.train.precompute_ref_logps:
        seconds, first_batch_s = trainer.precompute_reference_logps()
        manifest["ref_logps_precompute_s"] = round(seconds, 1)
        manifest["ref_logps_first_batch_s"] = round(first_batch_s, 1)
        manifest["ref_logps_pairs"] = len(trainer.train_dataset)
        log.info("train: reference log-probs of %d pairs precomputed in %.1f s", len(trainer.train_dataset), seconds)

    output = trainer.train(resume_from_checkpoint=resume_from)

    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # peft saves adapter_model.safetensors + adapter_config.json (rank 0)
    peak = max(distributed.gather(_peak_memory_gb(device)))
    if world.is_main:
        processor.save_pretrained(str(adapter_dir))
        manifest.update(
            status="completed", end=now(), global_step=trainer.state.global_step,
            train_metrics={k: v for k, v in output.metrics.items() if isinstance(v, (int, float))},
            peak_memory_gb=peak,
        )
        write_json_atomic(run_dir / "manifest.json", manifest)
    distributed.barrier()  # the adapter and manifest are on disk before any process returns
    log.info("done: %d optimizer steps, adapter in %s", trainer.state.global_step, adapter_dir)
    from .plots import plot_training

    plot = plot_training(run_dir) if world.is_main else None
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
        # bitsandbytes quantizes while loading, onto the device given here: this process's GPU under torchrun
        kwargs["device_map"] = {"": distributed.world().local_rank if device == "cuda" else "cpu"}
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


def build_trainer(cfg: Config, run_dir: Path, device: str, model, processor, train_ds, eval_ds, plan: BatchPlan | None = None):
    """TRL's DPOConfig and our trainer from the config; `plan` splits the global batch (default: this job's)."""
    from peft import LoraConfig
    from .trainer import OneGPUPerProcessConfig as DPOConfig

    from .dora import use_fused_dora
    from .trainer import SmolboxDPOTrainer

    t = cfg.train
    plan = plan or plan_batches(t, distributed.world().size)
    args = DPOConfig(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.learning_rate, beta=t.beta,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=plan.accumulation,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=t.max_length,
        bf16=t.bf16, use_cpu=device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5.23's name; the old one warns
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=t.eval_steps or t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        seed=t.seed, data_seed=t.seed,
        # Several processes: every step uses every adapter (each row has an image, so the vision tower's too), and
        # DDP need not search the graph for unused parameters after every forward.
        ddp_timeout=t.ddp_timeout_s, ddp_find_unused_parameters=False,
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
    trainer.pack_pairs = t.pack_pairs
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


@dataclass
class ResumePlan:
    checkpoint: str | None = None  # resume from this checkpoint
    finished: dict | None = None  # the manifest of a run that is already complete: nothing to do
    note: str | None = None  # what the log should say about it


def _plan_resume(cfg: Config, run_dir: Path) -> ResumePlan:
    previous = read_json(run_dir / "manifest.json")
    if previous is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir} exists, is not empty and has no manifest.json: choose another run.name or empty it")
        return ResumePlan()
    then = previous.get("config", {})
    differing = [key for key, value in cfg.weight_settings().items() if get_dotted(then, key) != value]
    if differing:
        changes = "; ".join(f"{key} is {get_dotted(cfg.to_dict(), key)!r} now, {get_dotted(then, key)!r} there" for key in differing)
        raise RunError(f"{run_dir} was trained with other settings that shape the weights ({changes}); refusing to mix "
                       "runs. Set them back, choose another run.name, or delete that folder.")
    if cfg.run.resume == "never":
        raise RunError(f"{run_dir} already holds a run and run.resume=never: choose another run.name or set run.resume=auto")
    longer = {key: (get_dotted(then, key), get_dotted(cfg.to_dict(), key)) for key in LENGTH_KEYS
              if get_dotted(then, key) != get_dotted(cfg.to_dict(), key)}
    if cfg.run.resume == "auto":
        if previous.get("status") == "completed" and not longer and (run_dir / "adapter").is_dir():
            return ResumePlan(finished=previous)
        checkpoints = complete_checkpoints(run_dir)
        checkpoint = str(checkpoints[-1]) if checkpoints else None
    else:
        checkpoint = cfg.run.resume
        if not (Path(checkpoint) / COMPLETE_MARKER).is_file():
            raise RunError(f"run.resume={checkpoint} is not a complete checkpoint (no {COMPLETE_MARKER} in it)")
    note = None
    if longer and checkpoint:
        note = (f"continuing the run from {checkpoint} with a new length ("
                + "; ".join(f"{key} {old} -> {new}" for key, (old, new) in longer.items())
                + "): the learning-rate schedule now spans the new length")
    return ResumePlan(checkpoint, None, note)


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
    """Writes metrics.jsonl (rank 0) and marks checkpoints complete once every process has written its part.

    pairs_per_s counts training alone: the time spent evaluating and saving checkpoints inside a logging window is
    taken out (evaluation has its own line, with eval_runtime). peak_memory_gb is the largest over the processes,
    peak_memory_gb_per_rank each one's. Every process runs the callbacks at the same points, so the gathers meet."""

    def __init__(self, metrics_path: Path, pairs_per_step: int, device: str):
        self.metrics_path = metrics_path
        self.pairs_per_step = pairs_per_step
        self.device = device
        self.window_start = self.step_end = time.perf_counter()
        self.window_step = 0
        self.paused = 0.0  # seconds of evaluation and saving inside the current window

    def on_train_begin(self, args, state, control, **kw):
        self.window_start = self.step_end = time.perf_counter()
        self.window_step, self.paused = state.global_step, 0.0

    def on_step_end(self, args, state, control, **kw):
        self.step_end = time.perf_counter()

    def _pause_since_step_end(self) -> None:
        now_ = time.perf_counter()
        self.paused += now_ - self.step_end
        self.step_end = now_

    def on_evaluate(self, args, state, control, **kw):
        self._pause_since_step_end()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        record = {"step": state.global_step, "epoch": state.epoch, "time": now()}
        if "loss" in logs:  # a training log: throughput since the previous one
            elapsed = time.perf_counter() - self.window_start - self.paused
            steps = state.global_step - self.window_step
            if steps > 0 and elapsed > 0:
                record["pairs_per_s"] = round(steps * self.pairs_per_step / elapsed, 4)
            self.window_start = self.step_end = time.perf_counter()
            self.window_step, self.paused = state.global_step, 0.0
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and not math.isnan(v)})
        peaks = distributed.gather(_peak_memory_gb(self.device))
        record["peak_memory_gb"] = max(peaks)
        if len(peaks) > 1:
            record["peak_memory_gb_per_rank"] = peaks
        if state.is_world_process_zero:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def on_save(self, args, state, control, **kw):
        self._pause_since_step_end()
        distributed.barrier()  # every process has written its part of the checkpoint (its RNG state)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
