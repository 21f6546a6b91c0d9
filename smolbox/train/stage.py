"""The train stage, read top to bottom: which run folder and where it resumes, the data and the model, the
trainer and its callbacks, training, the adapter and the manifest.

runs/<name>/
  adapter/            the trained DoRA adapter (safetensors) and the processor
  checkpoints/        checkpoint-<step>/ every save_steps, the last save_total_limit kept
  metrics.jsonl       one JSON line per log/eval event
  manifest.json       versions, git commit, resolved config + hash, data fingerprints, device, times, status
  train.log           the log lines printed to the console
  training.png        metrics.jsonl as curves (smolbox.plots)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback, set_seed

from .. import logs, tiny
from ..config import Config
from ..env import device_description, resolve_attention, resolve_device
from ..manifest import now, write_json_atomic
from ..models import load_base, load_processor
from . import attention, distributed
from .batches import BatchPlan
from .data import load_preference_data
from .progress import use_console_progress
from .plan import plan_run
from .resume import checkpoint_step, truncate_metrics
from .run_folder import RunCallback, peak_memory_gb, start_manifest
from .trainer import build_trainer

log = logging.getLogger("smolbox.train")


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    manifest: dict
    global_step: int
    resumed_from: str | None
    plot: Path | None = None  # training curves (PNG), when matplotlib is installed


def train(cfg: Config, callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Train, or resume, the run <run.output_dir>/<run.name>; `callbacks` are added to the Trainer after smolbox's
    own (benchmarks time steps and profile through them; tests watch the model through them).

    Under torchrun / accelerate launch every process calls this; rank 0 writes the run folder."""
    device = resolve_device(cfg)
    world = distributed.start(device, cfg.train.ddp_timeout_s)
    plan, run_dir, resume = plan_run(cfg, world.size)
    if resume.finished is not None:
        # Nothing is written: not the log, not the manifest (print, since the run's log file is not opened).
        print(f"smolbox: {run_dir} is complete ({resume.finished.get('global_step')} optimizer steps); nothing to do. "
              "To train it further, raise train.max_steps or train.num_train_epochs.", file=sys.stderr)
        return TrainResult(run_dir, run_dir / "adapter", resume.finished, resume.finished.get("global_step", 0), None)
    resume_from = resume.checkpoint
    distributed.barrier()  # every process has read the run folder before rank 0 writes to it
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        logs.log_to_file(run_dir / "train.log")
    else:
        logging.getLogger(logs.ROOT).setLevel(logging.WARNING)  # one voice: rank 0's

    manifest = start_manifest(cfg, run_dir, resume_from) if world.is_main else {}
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
    attn, attn_reason = resolve_attention(cfg, device)
    log.info("device: %s; attention: %s (%s)", device, attn, attn_reason)
    log.info("batch: %d pairs a step = %d process(es) x micro-batch %d x accumulation %d",
             plan.pairs_per_step, plan.processes, plan.micro_batch, plan.accumulation)
    jobs = distributed.describe(device)
    manifest.update(device=device_description(device), attention={"implementation": attn, "reason": attn_reason},
                    distributed=jobs, batch={"global": plan.pairs_per_step, "micro_batch": plan.micro_batch,
                                             "accumulation": plan.accumulation, "processes": plan.processes})
    set_seed(cfg.train.seed)
    with attention.run_backends(cfg.train.cudnn_attention, device):
        return _train(cfg, run_dir, device, plan, resume_from, manifest, callbacks, attn)


def _train(cfg: Config, run_dir: Path, device: str, plan: BatchPlan, resume_from: str | None, manifest: dict,
           callbacks: list, attn: str) -> TrainResult:
    world = distributed.world()
    with distributed.local_main_first():  # one process per host builds the tiny bundle and the data caches
        model_path = tiny.resolve(cfg.model.id, "model")
        processor = load_processor(model_path, cfg, revision=cfg.model.revision)
        train_split = load_preference_data(cfg.data, cfg.data.train_split)
        eval_split = load_preference_data(cfg.data, cfg.data.eval_split) if cfg.data.eval_split else None
    manifest["data"] = {name: _split_facts(s) for name, s in (("train", train_split), ("eval", eval_split)) if s}
    if world.is_main:
        write_json_atomic(run_dir / "manifest.json", manifest)

    model = load_base(cfg, device, attn, model_path, gpu=world.local_rank)
    trainer = build_trainer(cfg, run_dir, device, model, processor, train_split.dataset, eval_split and eval_split.dataset, plan)
    use_console_progress(trainer)  # one compact metrics line per logging step; bars only on a terminal
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from:
        if world.is_main:
            truncate_metrics(metrics_path, checkpoint_step(Path(resume_from)))
        log.info("resuming from %s", resume_from)
    trainer.add_callback(RunCallback(metrics_path, plan.pairs_per_step, device))
    for callback in callbacks:
        trainer.add_callback(callback)
    if cfg.train.compile:
        from .compile import compile_counts, compiled_since

        compiled_before = compile_counts()
    if cfg.train.precompute_ref_logps:
        seconds, first_batch_s = trainer.precompute_reference_logps()
        manifest["ref_logps_precompute_s"] = round(seconds, 1)
        manifest["ref_logps_first_batch_s"] = round(first_batch_s, 1)
        manifest["ref_logps_pairs"] = len(trainer.train_dataset)
        log.info("train: reference log-probs of %d pairs precomputed in %.1f s", len(trainer.train_dataset), seconds)

    output = trainer.train(resume_from_checkpoint=resume_from)
    if cfg.train.compile:
        manifest["compile"] = compiled = compiled_since(compiled_before)
        log.info("train: torch.compile made %d graphs with %d graph breaks%s", compiled["graphs"],
                 sum(compiled["graph_breaks"].values()), " (their reasons: manifest.json)" if compiled["graph_breaks"] else "")

    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # peft saves adapter_model.safetensors + adapter_config.json (rank 0)
    peak = max(distributed.gather(peak_memory_gb(device)))
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
    from ..plots import plot_training

    plot = plot_training(run_dir) if world.is_main else None
    return TrainResult(run_dir, adapter_dir, manifest, trainer.state.global_step, resume_from, plot)


def _split_facts(split) -> dict:
    return {"source": split.source, "rows_in": split.rows_in, "rows": len(split.dataset), "skipped": split.skipped, "fingerprint": split.fingerprint}
