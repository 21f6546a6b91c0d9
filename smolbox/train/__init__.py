"""Train stage: DPO with TRL on a 4-bit NF4 SmolVLM with DoRA adapters, on one process or many (torchrun).

  stage.py        train(): the run folder, data, model, trainer and callbacks, training, the adapter and manifest
  run_folder.py   resume plans, the manifest's start, metrics.jsonl and checkpoint completion markers
  batches.py      how a step's global batch splits over processes, micro-batches and accumulation
  data.py         preference data: load, clean, count what was dropped
  trainer.py      TRL's DPOTrainer with smolbox's forward and loss, the whole-steps sampler, build_trainer()
  dpo.py          the DPO forward and loss (pair packing), checked against stock TRL in tests
  dora.py         DoRA's forward as one GEMM epilogue and one scale (adapter.fused_dora)
  distributed.py  what training needs from torch.distributed (rank 0 owns the run folder)
  progress.py     one console line per logging step
"""

from .batches import BatchPlan, plan_batches
from .run_folder import COMPLETE_MARKER, RunCallback, RunError
from .stage import TrainResult, train
from .trainer import build_trainer

__all__ = ["COMPLETE_MARKER", "BatchPlan", "RunCallback", "RunError", "TrainResult", "build_trainer", "plan_batches", "train"]
