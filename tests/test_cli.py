"""The commands a user types, run as subprocesses exactly as the README and the container entrypoints do."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def smolbox(*args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "smolbox", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_every_stage_offline_and_answers_right(tmp_path, tiny_bundle):
    result = smolbox("demo", "--env-file", "", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "CPU only" in out and "bitsandbytes 4-bit" in out
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter_model.safetensors").is_file()
    # The served model answers its question right (a pink square: the color the base model calls red).
    assert "Q: What color is the square?" in out and "\nA: The square is pink.\n" in out
    # One line on what training changed, one per variant on what it kept, then what to try next.
    assert re.search(r"training changed: held-out answers right \d+% -> \d+%", out)
    for variant in ("fp32", "fp16", "q8", "q4", "q4f16", "int8"):
        assert re.search(rf"^ *{variant} kept: answers right \d+%", out, re.M), variant
    assert "smolbox serve --config tiny" in out and "curl" in out and "parity flagged" not in out
    for picture in ("runs/tiny/training.png", "runs/tiny/eval.png", "exports/tiny/eval.png"):
        assert picture in out and (tmp_path / picture).read_bytes().startswith(b"\x89PNG"), picture


def test_verify_exits_non_zero_with_a_fix_on_a_blocking_failure(tmp_path, tiny_bundle):
    result = smolbox("verify", "--config", "tiny", "--env-file", "", "--run.device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "fail" in result.stdout and "fix:" in result.stdout


def test_env_file_feeds_the_config(tmp_path):
    (tmp_path / ".env").write_text("SMOLBOX_CONFIG=tiny\nSMOLBOX_TRAIN__LEARNING_RATE=0.25\n")
    result = smolbox("config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.25" in result.stdout and "builtin:tiny" in result.stdout


@pytest.mark.parametrize("stage", ["verify", "train", "export", "eval", "serve"])
def test_entrypoints_only_exec_the_cli(stage):
    script = (REPO / "entrypoints" / stage).read_text().strip().splitlines()
    commands = [line for line in script if line and not line.startswith("#")]
    assert commands == [f'exec smolbox {stage} "$@"']
    assert os.access(REPO / "entrypoints" / stage, os.X_OK)


@pytest.mark.parametrize("command", ["verify", "train", "export", "eval", "serve"])
def test_every_command_prints_its_help(tmp_path, command):
    """Every config field is a flag with its description as help; a '%' in one (train[:6%]) broke --help."""
    result = smolbox(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--train.learning_rate" in result.stdout and "--serve.ort_session_config" in result.stdout
