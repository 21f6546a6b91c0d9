"""The train stage end to end on the tiny bundle: real TRL + peft DoRA + bitsandbytes NF4 on CPU. The reference is
the session's tiny run (configs/tiny.yaml as it is); the runs here train beside it or resume copies of it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from smolbox.config import load_config
from smolbox.train import COMPLETE_MARKER, RunError, plan_batches, train

TINY = load_config("tiny", env={}, dotenv=None).train
STEPS, SAVE_EVERY = TINY.max_steps, TINY.save_steps


def cli_args(output_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "smolbox", "train", "--config", "tiny", "--env-file", "",
            "--run.output_dir", str(output_dir), "--run.name", name]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(run_dir) if "loss" in m]


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_run):
    return tiny_run.run_dir.parent


@pytest.fixture(scope="module")
def reference_run(tiny_run):
    return tiny_run


def test_run_writes_adapter_checkpoints_metrics_and_manifest(reference_run):
    run_dir = reference_run.run_dir
    assert reference_run.global_step == STEPS
    weights = adapter_weights(run_dir)
    assert any("lora_A" in k for k in weights) and any("lora_magnitude_vector" in k for k in weights)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["use_dora"] is True

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{STEPS - SAVE_EVERY}", f"checkpoint-{STEPS}"]  # save_total_limit: 2
    assert all((run_dir / "checkpoints" / c / COMPLETE_MARKER).is_file() for c in checkpoints)

    records = metrics(run_dir)
    train_logs = [r for r in records if "loss" in r]
    eval_logs = [r for r in records if "eval_loss" in r]
    assert len(train_logs) == STEPS // 2  # logging_steps: 2
    for key in ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "pairs_per_s", "peak_memory_gb"):
        assert all(key in r for r in train_logs), key
    assert eval_logs and all("eval_rewards/accuracies" in r and r["eval_runtime"] > 0 for r in eval_logs)

    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "completed" and m["start"] and m["end"] and m["global_step"] == STEPS
    assert m["config"]["train"]["max_steps"] == STEPS and len(m["config_fingerprint"]) == 16
    assert m["seed"] == 7 and m["device"]["device"] == "cpu"
    assert m["attention"]["implementation"] == "sdpa"
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        assert m["versions"][pkg], pkg
    assert "git_commit" in m
    for split in ("train", "eval"):
        assert len(m["data"][split]["fingerprint"]) == 64 and m["data"][split]["rows"] > 0
        assert isinstance(m["data"][split]["skipped"], dict)


class ModelCalls(TrainerCallback):
    """Counts the trained model's forward calls from the first training step on, through the callbacks seam."""

    def __init__(self):
        self.calls, self.hook = 0, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.hook = model.register_forward_pre_hook(lambda module, inputs: setattr(self, "calls", self.calls + 1))

    def on_train_end(self, args, state, control, **kw):
        self.hook.remove()


def test_precomputed_reference_logps_give_the_same_losses(tiny_config, reference_run):
    """train.precompute_ref_logps: the reference log-probs come from one pass before training, not every step, so a
    training step runs the model once per micro-batch (the policy) instead of twice (policy and reference)."""
    from smolbox.train.data import load_preference_data

    # The first half of the reference run's steps: with tiny.yaml's constant learning rate they are the same steps.
    assert TINY.lr_scheduler_type == "constant"
    steps = STEPS // 2
    cfg = tiny_config(**{"run.name": "precomputed", "train.precompute_ref_logps": True, "data.eval_split": None,
                         "train.max_steps": steps})
    calls = ModelCalls()
    pre = train(cfg, callbacks=[calls])
    plan = plan_batches(cfg.train, 1)
    assert calls.calls == steps * plan.accumulation, "training steps still ran the reference"
    rows = len(load_preference_data(cfg.data, cfg.data.train_split).dataset)
    ours, expected = losses(pre.run_dir), losses(reference_run.run_dir)
    assert [s for s, _ in ours] == [s for s, _ in expected if s <= steps]
    expected = expected[:len(ours)]
    # The reference pass runs in other batch shapes (eval batch size) than in the steps: through bitsandbytes' 4-bit
    # CPU kernels that changes the last bits (docs/notes.md), and the trajectories drift in the last digits.
    np.testing.assert_allclose([l for _, l in ours], [l for _, l in expected], rtol=3e-4)
    rewards = [m["rewards/margins"] for m in metrics(pre.run_dir) if "rewards/margins" in m]
    expected_rewards = [m["rewards/margins"] for m in metrics(reference_run.run_dir) if "rewards/margins" in m][:len(rewards)]
    np.testing.assert_allclose(rewards, expected_rewards, rtol=0.05, atol=1e-4)
    assert pre.manifest["ref_logps_precompute_s"] > 0
    assert pre.manifest["ref_logps_pairs"] == rows


SHORT = {"run.name": "short", "data.eval_split": None, "train.max_steps": 4}


@pytest.fixture(scope="module")
def short_run(tiny_config):
    """4 steps without evaluation, counting the model's calls; test_continuing_... trains it further."""
    calls = ModelCalls()
    run = train(tiny_config(**SHORT), callbacks=[calls])
    return run, calls.calls


def test_the_same_steps_without_the_precomputed_pass_run_the_model_twice(tiny_config, short_run):
    """The other side of the count above: with the reference computed in the step, every micro-batch runs the
    model twice (reference, then policy)."""
    run, calls = short_run
    assert not tiny_config().train.precompute_ref_logps
    assert calls == 2 * run.global_step * plan_batches(tiny_config().train, 1).accumulation


@pytest.mark.slow  # a training process of its own, killed mid-run
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_config, runs, reference_run):
    """A run SIGKILLed after its checkpoint at step 8 and started again ends with the session's run's adapter and
    every one of its logged losses, bit for bit: resuming loses and repeats nothing, and the same config and seed
    give the same training in another process (the killed run's first steps are its own)."""
    name = "killed"
    run_dir = runs / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (runs / "killed.log").open("w")
    proc = subprocess.Popen(cli_args(runs, name), env=env, stdout=log, stderr=subprocess.STDOUT)
    target = run_dir / "checkpoints" / "checkpoint-8" / COMPLETE_MARKER
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, "training ended before it was killed:\n" + (runs / "killed.log").read_text()[-3000:]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert not (run_dir / "adapter").exists()

    resumed = train(tiny_config(**{"run.name": name}))  # the same run, resumed here in-process (no second import)
    assert resumed.global_step == STEPS
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "completed" and m["global_step"] == STEPS
    assert m["resumed_from"].endswith(tuple(f"checkpoint-{s}" for s in range(8, STEPS, SAVE_EVERY)))
    assert [a["status"] for a in m["attempts"]] == ["running"]

    ours, reference = adapter_weights(run_dir), adapter_weights(reference_run.run_dir)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    assert losses(run_dir) == losses(reference_run.run_dir) and len(losses(run_dir)) == STEPS // 2


def test_explicit_resume_from_a_checkpoint(tiny_config, runs, reference_run):
    copy = runs / "explicit"
    shutil.copytree(reference_run.run_dir, copy)  # the session's run stays as it is
    checkpoint = copy / "checkpoints" / f"checkpoint-{STEPS - SAVE_EVERY}"
    again = train(tiny_config(**{"run.name": "explicit", "run.resume": str(checkpoint)}))
    assert again.resumed_from == str(checkpoint) and again.global_step == STEPS
    for key, tensor in adapter_weights(copy).items():
        assert torch.equal(tensor, adapter_weights(reference_run.run_dir)[key]), key


def test_run_dir_of_another_config_is_refused(tiny_config, runs, reference_run):
    with pytest.raises(RunError, match=r"train.learning_rate is 0.5 now, 0.0005 there"):
        train(tiny_config(**{"train.learning_rate": 0.5}))
    with pytest.raises(RunError, match="resume=never"):
        train(tiny_config(**{"run.resume": "never"}))
    with pytest.raises(RunError, match="not a complete checkpoint"):
        train(tiny_config(**{"run.resume": str(runs / "nowhere")}))


def test_cli_refusal_exits_non_zero(runs, reference_run):
    args = cli_args(runs, reference_run.run_dir.name) + ["--train.learning_rate", "0.5"]
    # refused before the stage's imports (smolbox.train.plan_run): torch, transformers and TRL are not loaded
    code = ("import sys\nfrom smolbox.cli import main\ncode = main(sys.argv[1:])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))\nsys.exit(code)")
    result = subprocess.run([args[0], "-c", code, *args[3:]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "train.learning_rate is 0.5 now" in result.stderr
    assert result.stdout.strip() == "[]"


def test_a_completed_run_is_left_untouched(tiny_config, reference_run, capsys):
    run_dir = reference_run.run_dir
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = train(tiny_config(**{"train.logging_steps": 4, "run.min_free_disk_gb": 0}))
    assert again.global_step == STEPS and again.resumed_from is None
    assert f"is complete ({STEPS} optimizer steps); nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_continuing_a_completed_run_is_stated_in_the_log(tiny_config, short_run):
    assert short_run[0].global_step == 4
    longer = train(tiny_config(**{**SHORT, "train.max_steps": 6}))
    assert longer.global_step == 6 and longer.resumed_from.endswith("checkpoint-4")
    log = (longer.run_dir / "train.log").read_text()
    assert "with a new length (train.max_steps 4 -> 6)" in log


def test_report_to_passes_through_to_the_trackers(tiny_config):
    """train.report_to goes to transformers' integrations as it is (off by default): without the tracker's package
    the run stops before its first step, naming what is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    assert load_config("tiny", env={}, dotenv=None).train.report_to == []
    with pytest.raises(RuntimeError, match="requires tensorboard"):
        train(tiny_config(**{"run.name": "tracked", "train.report_to": ["tensorboard"], "data.eval_split": None}))
