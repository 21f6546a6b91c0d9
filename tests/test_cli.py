"""The commands a user types, run as subprocesses exactly as the README and the container entrypoints do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def smolbox(*args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "smolbox", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_verify_and_training_offline(tmp_path, tiny_bundle):
    result = smolbox("demo", "--env-file", "", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU only" in result.stdout and "bitsandbytes 4-bit" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter_model.safetensors").is_file()


def test_verify_exits_non_zero_with_a_fix_on_a_blocking_failure(tmp_path, tiny_bundle):
    result = smolbox("verify", "--config", "tiny", "--env-file", "", "--run.device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "fail" in result.stdout and "fix:" in result.stdout


def test_env_file_feeds_the_config(tmp_path):
    (tmp_path / ".env").write_text("SMOLBOX_CONFIG=tiny\nSMOLBOX_TRAIN__LEARNING_RATE=0.25\n")
    result = smolbox("config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.25" in result.stdout and "builtin:tiny" in result.stdout


@pytest.mark.parametrize("stage", ["verify", "train", "export", "serve"])
def test_entrypoints_only_exec_the_cli(stage):
    script = (REPO / "entrypoints" / stage).read_text().strip().splitlines()
    commands = [line for line in script if line and not line.startswith("#")]
    assert commands == [f'exec smolbox {stage} "$@"']
    assert os.access(REPO / "entrypoints" / stage, os.X_OK)


@pytest.mark.parametrize("command", ["verify", "train", "export", "serve"])
def test_every_command_prints_its_help(tmp_path, command):
    """Every config field is a flag with its description as help; a '%' in one (train[:6%]) broke --help."""
    result = smolbox(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--train.learning_rate" in result.stdout and "--serve.ort_session_config" in result.stdout
