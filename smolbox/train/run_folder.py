"""The run folder, runs/<name>/: its manifest's start, and the callback that writes metrics.jsonl and marks
checkpoints complete (whether and where a run resumes: resume.py). Rank 0 writes; every process reads."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import __version__
from ..config import Config
from ..env import git_commit, package_versions
from ..manifest import image_labels, now, read_json, write_json_atomic
from . import distributed
from .resume import COMPLETE_MARKER

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
