"""The train stage end to end on the tiny bundle: real TRL + peft DoRA + bitsandbytes NF4 on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smolbox.config import load_config
from smolbox.train import COMPLETE_MARKER, RunError, plan_batches, train

STEPS = 24
SAVE_EVERY = 4


def tiny_cfg(output_dir: Path, name: str, **extra):
    overrides = {"run.output_dir": str(output_dir), "run.name": name, "train.max_steps": STEPS, "train.save_steps": SAVE_EVERY, **extra}
    return load_config("tiny", overrides=overrides, env={}, dotenv=None)


def cli_args(output_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "smolbox", "train", "--config", "tiny", "--env-file", "",
            "--run.output_dir", str(output_dir), "--run.name", name,
            "--train.max_steps", str(STEPS), "--train.save_steps", str(SAVE_EVERY)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(run_dir) if "loss" in m]


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bundle):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference_run(runs):
    return train(tiny_cfg(runs, "reference"))


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
    assert eval_logs and all("eval_rewards/accuracies" in r for r in eval_logs)

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


def test_same_config_and_seed_give_identical_losses(runs, reference_run):
    again = train(tiny_cfg(runs, "determinism"))
    assert losses(again.run_dir) == losses(reference_run.run_dir)
    assert len(losses(again.run_dir)) == STEPS // 2


def test_precomputed_reference_logps_give_the_same_losses(runs, reference_run, monkeypatch):
    """train.precompute_ref_logps: the reference log-probs come from one pass before training, not every step."""
    from smolbox import dpo
    from smolbox.data import load_preference_data

    calls = []
    original = dpo.reference_logps
    monkeypatch.setattr(dpo, "reference_logps", lambda *args: calls.append(1) or original(*args))
    cfg = tiny_cfg(runs, "precomputed", **{"train.precompute_ref_logps": True, "data.eval_split": None})
    pre = train(cfg)
    rows = len(load_preference_data(cfg.data, cfg.data.train_split).dataset)
    assert len(calls) == -(-rows // cfg.train.per_device_eval_batch_size), "training steps still ran the reference"
    ours, expected = losses(pre.run_dir), losses(reference_run.run_dir)
    assert [s for s, _ in ours] == [s for s, _ in expected]
    # The reference pass runs in other batch shapes (eval batch size) than in the steps: through bitsandbytes' 4-bit
    # CPU kernels that changes the last bits (docs/notes.md), and the 16-step trajectories drift by ~6e-5.
    np.testing.assert_allclose([l for _, l in ours], [l for _, l in expected], rtol=3e-4)
    rewards = [m["rewards/margins"] for m in metrics(pre.run_dir) if "rewards/margins" in m]
    expected_rewards = [m["rewards/margins"] for m in metrics(reference_run.run_dir) if "rewards/margins" in m]
    np.testing.assert_allclose(rewards, expected_rewards, rtol=0.05, atol=1e-4)
    assert pre.manifest["ref_logps_precompute_s"] > 0
    assert pre.manifest["ref_logps_pairs"] == rows


def test_sigkill_then_resume_matches_an_uninterrupted_run(runs, reference_run):
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

    resumed = subprocess.run(cli_args(runs, name), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "completed" and m["global_step"] == STEPS
    assert m["resumed_from"].endswith(tuple(f"checkpoint-{s}" for s in range(8, STEPS, SAVE_EVERY)))
    assert [a["status"] for a in m["attempts"]] == ["running"]

    ours, reference = adapter_weights(run_dir), adapter_weights(reference_run.run_dir)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    assert losses(run_dir) == losses(reference_run.run_dir)


def test_explicit_resume_from_a_checkpoint(runs, reference_run):
    checkpoint = reference_run.run_dir / "checkpoints" / f"checkpoint-{STEPS - SAVE_EVERY}"
    again = train(tiny_cfg(runs, "reference", **{"run.resume": str(checkpoint)}))
    assert again.resumed_from == str(checkpoint) and again.global_step == STEPS


def test_run_dir_of_another_config_is_refused(runs, reference_run):
    with pytest.raises(RunError, match=r"train.learning_rate is 0.5 now, 0.0005 there"):
        train(tiny_cfg(runs, "reference", **{"train.learning_rate": 0.5}))
    with pytest.raises(RunError, match="resume=never"):
        train(tiny_cfg(runs, "reference", **{"run.resume": "never"}))
    with pytest.raises(RunError, match="not a complete checkpoint"):
        train(tiny_cfg(runs, "reference", **{"run.resume": str(runs / "nowhere")}))


def test_cli_refusal_exits_non_zero(runs, reference_run):
    args = cli_args(runs, "reference") + ["--train.learning_rate", "0.5"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "train.learning_rate is 0.5 now" in result.stderr


def test_a_completed_run_is_left_untouched(runs, reference_run, capsys):
    run_dir = reference_run.run_dir
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = train(tiny_cfg(runs, "reference", **{"train.logging_steps": 4, "run.min_free_disk_gb": 0}))
    assert again.global_step == STEPS and again.resumed_from is None
    assert "is complete (24 optimizer steps); nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_continuing_a_completed_run_is_stated_in_the_log(runs):
    short = {"data.eval_split": None, "train.max_steps": 4}
    assert train(tiny_cfg(runs, "continued", **short)).global_step == 4
    longer = train(tiny_cfg(runs, "continued", **{**short, "train.max_steps": 6}))
    assert longer.global_step == 6 and longer.resumed_from.endswith("checkpoint-4")
    log = (longer.run_dir / "train.log").read_text()
    assert "with a new length (train.max_steps 4 -> 6)" in log


@pytest.mark.parametrize("processes, micro, accumulation", [(1, 2, 2), (2, 2, 1), (4, 1, 1)])
def test_global_batch_is_split_over_processes(processes, micro, accumulation):
    plan = plan_batches(tiny_cfg(Path("."), "x").train, processes)
    assert (plan.micro_batch, plan.accumulation, plan.pairs_per_step) == (micro, accumulation, 4)


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(RunError, match="cannot be split evenly over 3 processes: use 1, 2, 4 GPUs"):
        plan_batches(tiny_cfg(Path("."), "x").train, 3)


def test_whole_steps_sampler_cuts_each_epoch_to_whole_steps():
    from smolbox.trainer import WholeStepsSampler

    sampler = WholeStepsSampler(10, 4, seed=7)
    first = list(sampler)
    assert len(sampler) == len(first) == 8 and len(set(first)) == 8 and set(first) <= set(range(10))
    assert list(WholeStepsSampler(10, 4, seed=7)) == first  # the order depends on seed and epoch only
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        WholeStepsSampler(3, 4, seed=7)


def test_report_to_passes_through_to_the_trackers(runs):
    """train.report_to goes to transformers' integrations as it is (off by default): without the tracker's package
    the run stops before its first step, naming what is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    assert load_config("tiny", env={}, dotenv=None).train.report_to == []
    with pytest.raises(RuntimeError, match="requires tensorboard"):
        train(tiny_cfg(runs, "tracked", **{"train.report_to": ["tensorboard"], "data.eval_split": None}))
