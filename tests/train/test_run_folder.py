"""RunCallback's throughput arithmetic, with a clock the test drives: pairs_per_s counts training time alone, the
time spent evaluating and saving checkpoints inside a logging window is taken out."""

import json

from transformers import TrainerControl, TrainerState, TrainingArguments

from smolbox.train.run_folder import RunCallback


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pairs_per_s_leaves_out_evaluation_and_checkpoint_time(tmp_path):
    clock, path = Clock(), tmp_path / "metrics.jsonl"
    callback = RunCallback(path, pairs_per_step=4, device="cpu", clock=clock)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = True

    def step(seconds):  # one optimizer step that takes `seconds`
        clock.now += seconds
        state.global_step += 1
        callback.on_step_end(args, state, control)

    callback.on_train_begin(args, state, control)
    step(1.0), step(1.0)
    callback.on_log(args, state, control, logs={"loss": 0.69})  # 8 pairs in 2 s
    clock.now += 10.0  # evaluation
    callback.on_log(args, state, control, logs={"eval_loss": 0.68, "eval_runtime": 10.0})
    callback.on_evaluate(args, state, control)
    clock.now += 5.0  # writing a checkpoint
    callback.on_save(args, state, control)
    step(0.5), step(0.5)
    callback.on_log(args, state, control, logs={"loss": 0.67})  # 8 pairs in 1 s of training, 16 s of wall time

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("pairs_per_s") for r in records] == [4.0, None, 8.0]
    assert records[1]["eval_runtime"] == 10.0 and "pairs_per_s" not in records[1]
