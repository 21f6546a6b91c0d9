"""Train stage: DPO with TRL on a 4-bit NF4 SmolVLM with DoRA adapters, on one process or many (torchrun).

  stage.py        train(): the run folder, data, model, trainer and callbacks, training, the adapter and manifest
  plan.py         plan_run(): the batch split and the resume plan, refused before any work, without torch
  resume.py       resume plans and checkpoint completion markers, from the run folder's files
  run_folder.py   the manifest's start, metrics.jsonl, checkpoints marked complete
  batches.py      how a step's global batch splits over processes, micro-batches and accumulation
  data.py         preference data: load, clean, count what was dropped
  trainer.py      TRL's DPOTrainer with smolbox's forward and loss, the whole-steps sampler, build_trainer()
  dpo.py          the DPO forward and loss (pair packing), checked against stock TRL in tests
  dora.py         DoRA's forward as one GEMM epilogue and one scale (adapter.fused_dora)
  distributed.py  what training needs from torch.distributed (rank 0 owns the run folder)
  progress.py     one console line per logging step
"""

from .batches import BatchPlan, plan_batches
from .plan import plan_run
from .resume import COMPLETE_MARKER, RunError

__all__ = ["COMPLETE_MARKER", "BatchPlan", "RunCallback", "RunError", "TrainResult", "build_trainer", "plan_batches",
           "plan_run", "train"]
_HEAVY = {"train": "stage", "TrainResult": "stage", "build_trainer": "trainer", "RunCallback": "run_folder"}


def __getattr__(name: str):
    # the stage, the trainer and the callback import torch, transformers and TRL: only when used, so that plan_run()
    # (the CLI's refusals) and plan_batches (verify) run without them
    if name in _HEAVY:
        import importlib

        return getattr(importlib.import_module(f".{_HEAVY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
