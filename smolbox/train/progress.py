"""Training progress on the console: one compact line per logging step, and a progress bar only on a terminal.

transformers prints each log event as a Python dict beside its bar; in a log file or `docker logs` the bar's
carriage returns and those dicts run into each other. metrics.jsonl (run_folder.RunCallback) keeps every number; the
console gets the few that tell how training goes.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback

# (log key, label) in the order they are printed; eval events carry the same keys with an "eval_" prefix.
SHOWN = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"), ("learning_rate", "lr"),
         ("grad_norm", "grad"), ("epoch", "epoch"))


def metrics_line(step: int, max_steps: int, logs: dict) -> str:
    if "train_runtime" in logs:  # the summary at the end of trainer.train()
        loss = f", mean loss {logs['train_loss']:.4g}" if "train_loss" in logs else ""
        return f"trained to step {step}/{max_steps} in {logs['train_runtime']:.0f} s{loss}"
    is_eval = any(key.startswith("eval_") for key in logs)
    values = {key: logs.get(key if key == "epoch" or not is_eval else f"eval_{key}") for key, _ in SHOWN}
    parts = [f"{label} {values[key]:.4g}" for key, label in SHOWN if isinstance(values[key], (int, float))]
    return f"{'eval' if is_eval else 'step'} {step}/{max_steps}  " + "  ".join(parts)


class ConsoleProgress(ProgressCallback):
    """transformers' ProgressCallback with its log dicts replaced by `metrics_line`, written through tqdm so a bar
    never cuts a line; without a terminal on stderr there are no bars at all."""

    def __init__(self, bars: bool | None = None):
        super().__init__()
        self.bars = sys.stderr.isatty() if bars is None else bars

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            tqdm.write(metrics_line(state.global_step, state.max_steps, logs), file=sys.stdout)


def use_console_progress(trainer) -> None:
    """Swap transformers' progress/printer callback for ConsoleProgress."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleProgress())
