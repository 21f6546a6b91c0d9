"""What a training run is refused for before any work: a global batch that does not split over the processes, and a
run folder it must not continue (other weight-shaping settings, run.resume=never, an incomplete checkpoint). Files
and the config only, so the package imports it without torch, and `smolbox train` answers a refusal at once
instead of after loading torch, transformers and TRL."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from .batches import BatchPlan, plan_batches
from .distributed import world
from .resume import ResumePlan, plan_resume


def plan_run(cfg: Config, world_size: int | None = None) -> tuple[BatchPlan, Path, ResumePlan]:
    """The batch plan, the run folder and whether (and where) the run resumes, or RunError saying what to do.
    `world_size`: the job's processes (default: this process's job, from the variables torchrun sets)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    return plan_batches(cfg.train, world_size or world().size), run_dir, plan_resume(cfg, run_dir)
