"""Where a smolbox training micro-batch spends its time: torch.profiler over a few optimizer steps of a config on
the real-shape model (bench/real_shapes.py). Prints the top operators by self CUDA time and by self CPU time.

    python -m bench.train_profile --root /tmp/rs [--config default] [--micro-batch 4] [--workers 4] [--out prof.txt]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--config", default="default")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from smolbox.config import load_config
    from smolbox.train import train

    state = {}

    class Profile(TrainerCallback):
        def on_step_end(self, a, s, control, **kw):
            if s.global_step == 2:  # steps 3 and 4 are profiled; 1 and 2 warm up
                torch.cuda.synchronize()
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].__enter__()
            elif s.global_step == 4:
                torch.cuda.synchronize()
                state["prof"].__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, overrides={
            "model.id": str(args.root / "model"), "data.id": str(args.root / "data"), "data.train_split": "train",
            "data.eval_split": None, "data.num_proc": 1, "train.max_steps": 4, "train.logging_steps": 1,
            "train.save_steps": 100000, "train.global_batch_size": args.micro_batch,
            "train.per_device_train_batch_size": args.micro_batch, "train.dataloader_num_workers": args.workers,
            "run.output_dir": tmp, "run.name": "profile", "run.min_free_disk_gb": 0,
        }, env={}, dotenv=None)
        train(cfg, callbacks=[Profile()])
    averages = state["prof"].key_averages()
    text = (f"2 optimizer steps of {args.micro_batch} pairs ({args.config}, workers {args.workers})\n"
            + averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
            + "\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    if args.out:
        args.out.write_text(text)
    print(text[-9000:])


if __name__ == "__main__":
    main()
