"""How one optimizer step's pairs are split over processes, micro-batches and accumulation (verify checks a job's
split before anything starts)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from .resume import RunError


@dataclass(frozen=True)
class BatchPlan:
    """processes x micro-batch x accumulation = global_batch_size."""

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
    whatever the split (trainer.WholeStepsSampler), so the optimizer sees the same batches on any number of GPUs."""
    if t.global_batch_size % processes:
        fits = sorted({n for n in range(1, 9) if t.global_batch_size % n == 0})
        raise RunError(
            f"train.global_batch_size={t.global_batch_size} pairs cannot be split evenly over {processes} processes: "
            f"use {', '.join(map(str, fits))} GPUs, or a global batch that is a multiple of {processes} "
            f"(e.g. {t.global_batch_size // processes * processes or processes} or {(t.global_batch_size // processes + 1) * processes})")
    per_process = t.global_batch_size // processes
    micro = max(d for d in range(1, min(per_process, t.per_device_train_batch_size) + 1) if per_process % d == 0)
    return BatchPlan(processes, micro, per_process // micro)
