"""The run folder, runs/<name>/: whether and where a run resumes, its manifest's start, and the callback that
writes metrics.jsonl and marks checkpoints complete. Rank 0 writes; every process reads."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import __version__
from ..config import LENGTH_KEYS, Config, get_dotted
from ..env import git_commit, package_versions
from ..manifest import image_labels, now, read_json, write_json_atomic
from . import distributed

COMPLETE_MARKER = "SMOLBOX_COMPLETE"  # written after a checkpoint is fully on disk


class RunError(RuntimeError):
    """A run that must not start (wrong folder, unusable checkpoint); the message says what to do."""


# ---- resume -------------------------------------------------------------------------------------------------


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that were fully written, oldest first (a SIGKILL mid-save leaves one without the marker)."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


@dataclass
class ResumePlan:
    checkpoint: str | None = None  # resume from this checkpoint
    finished: dict | None = None  # the manifest of a run that is already complete: nothing to do
    note: str | None = None  # what the log should say about it


def plan_resume(cfg: Config, run_dir: Path) -> ResumePlan:
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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: those steps are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


# ---- manifest & metrics -------------------------------------------------------------------------------------


def start_manifest(cfg: Config, run_dir: Path, resume_from: str | None) -> dict:
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


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux reports KiB


class RunCallback(TrainerCallback):
    """Writes metrics.jsonl (rank 0) and marks checkpoints complete once every process has written its part.

    pairs_per_s counts training alone: the time spent evaluating and saving checkpoints inside a logging window is
    taken out (evaluation has its own line, with eval_runtime). peak_memory_gb is the largest over the processes,
    peak_memory_gb_per_rank each one's. Every process runs the callbacks at the same points, so the gathers meet.
    `clock` (seconds, monotonic) is a seam for tests that check the arithmetic with a clock they drive."""

    def __init__(self, metrics_path: Path, pairs_per_step: int, device: str, clock=time.perf_counter):
        self.metrics_path = metrics_path
        self.pairs_per_step = pairs_per_step
        self.device = device
        self.clock = clock
        self.window_start = self.step_end = clock()
        self.window_step = 0
        self.paused = 0.0  # seconds of evaluation and saving inside the current window

    def on_train_begin(self, args, state, control, **kw):
        self.window_start = self.step_end = self.clock()
        self.window_step, self.paused = state.global_step, 0.0

    def on_step_end(self, args, state, control, **kw):
        self.step_end = self.clock()

    def _pause_since_step_end(self) -> None:
        now_ = self.clock()
        self.paused += now_ - self.step_end
        self.step_end = now_

    def on_evaluate(self, args, state, control, **kw):
        self._pause_since_step_end()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        record = {"step": state.global_step, "epoch": state.epoch, "time": now()}
        if "loss" in logs:  # a training log: throughput since the previous one
            elapsed = self.clock() - self.window_start - self.paused
            steps = state.global_step - self.window_step
            if steps > 0 and elapsed > 0:
                record["pairs_per_s"] = round(steps * self.pairs_per_step / elapsed, 4)
            self.window_start = self.step_end = self.clock()
            self.window_step, self.paused = state.global_step, 0.0
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and not math.isnan(v)})
        peaks = distributed.gather(peak_memory_gb(self.device))
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
