"""The commands a user types, run as subprocesses exactly as the README and the container entrypoints do."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smolbox.config import load_config

REPO = Path(__file__).resolve().parent.parent


def smolbox(*args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "smolbox", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_every_stage_offline_and_answers_right(tiny_demo):
    """The demo ran in a new folder (tests/conftest.py: its run and export are the session's tiny run and export;
    with the slow checks, in a process of its own)."""
    result, tmp_path = tiny_demo, tiny_demo.folder
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
    # Readable output: one compact metrics line per logging step, no log dicts (no progress bars or library
    # warnings either: the next test).
    t = load_config("tiny", env={}, dotenv=None).train
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{s}/{t.max_steps}" for s in range(t.logging_steps, t.max_steps + 1, t.logging_steps)]
    assert all("loss " in line and "acc " in line for line in steps)
    assert "{'loss'" not in result.stdout + result.stderr


@pytest.mark.slow  # the demo in a process of its own (tests/conftest.py), as a user's terminal or log file sees it
def test_the_demo_prints_no_progress_bars_or_library_warnings(tiny_demo):
    """What the libraries print is settled when they are imported: in the test's process they were imported before
    the demo set its switches (no progress bars in a captured stream), and pytest takes their warnings."""
    assert tiny_demo.args[0] == sys.executable, "the demo ran in the test's process"
    output = tiny_demo.stdout + tiny_demo.stderr
    assert "\r" not in output and "it/s]" not in output
    assert "Warning" not in output and "kernels-community" not in output, tiny_demo.stderr


@pytest.mark.slow  # verify in a process of its own, which imports the training stack
def test_verify_exits_non_zero_with_a_fix_on_a_blocking_failure(tmp_path, tiny_bundle):
    result = smolbox("verify", "--config", "tiny", "--env-file", "", "--run.device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "fail" in result.stdout and "fix:" in result.stdout


def test_env_file_feeds_the_config(tmp_path):
    (tmp_path / ".env").write_text("SMOLBOX_CONFIG=tiny\nSMOLBOX_TRAIN__LEARNING_RATE=0.25\n")
    result = smolbox("config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.25" in result.stdout and "builtin:tiny" in result.stdout


@pytest.mark.parametrize("stage", ["verify", "export", "eval", "serve"])
def test_entrypoints_only_exec_the_cli(stage):
    script = (REPO / "entrypoints" / stage).read_text().strip().splitlines()
    commands = [line for line in script if line and not line.startswith("#")]
    assert commands == [f'exec smolbox {stage} "$@"']
    assert os.access(REPO / "entrypoints" / stage, os.X_OK)


def test_train_entrypoint_execs_the_cli_itself_or_through_torchrun():
    """Its behaviour on several processes and hosts runs in tests/test_distributed.py."""
    script = (REPO / "entrypoints" / "train").read_text()
    execs = [line.strip() for line in script.splitlines() if line.strip().startswith("exec ")]
    assert execs[-1] == 'exec smolbox train "$@"'
    assert all(e.startswith("exec torchrun ") for e in execs[:-1]) and len(execs) == 3
    assert script.count('-m smolbox train "$@"') == 2
    assert os.access(REPO / "entrypoints" / "train", os.X_OK)


@pytest.mark.parametrize("command", ["verify", "train", "export", "eval", "serve"])
def test_every_command_prints_its_help(tmp_path, command):
    """Every config field is a flag with its description as help; a '%' in one (train[:6%]) broke --help."""
    result = smolbox(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--train.learning_rate" in result.stdout and "--serve.ort_session_config" in result.stdout


def test_help_lists_every_command(tmp_path):
    from smolbox.cli import COMMANDS, build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == set(COMMANDS)
    result = smolbox("--help", cwd=tmp_path)
    assert result.returncode == 0
    usage, listing = result.stdout.split("positional arguments:")
    for name in choices:
        assert name in usage and f"\n    {name} " in listing, name


def test_unknown_flag_lists_the_section_keys_closest_first(tmp_path):
    result = smolbox("config", "--config", "tiny", "--env-file", "", "--train.learning", "1e-5", cwd=tmp_path)
    assert result.returncode == 2
    assert "--train.learning: unknown config key 'train.learning' (keys of 'train', closest first: learning_rate," in result.stderr
    result = smolbox("config", "--config", "tiny", "--env-file", "", "--serve.prot=80", cwd=tmp_path)
    assert result.returncode == 2 and "closest first: port," in result.stderr


@pytest.mark.slow  # four smolbox processes
def test_env_file_given_must_exist_but_the_default_is_optional(tmp_path):
    missing = smolbox("config", "--config", "tiny", "--env-file", "absent.env", cwd=tmp_path)
    assert missing.returncode == 2 and "--env-file absent.env: no such file" in missing.stderr
    assert smolbox("config", "--config", "tiny", cwd=tmp_path).returncode == 0  # no ./.env: fine
    # $SMOLBOX_ENV_FILE moves the optional default (the containers point it at the project's .env, which may be absent)
    (tmp_path / "project.env").write_text("SMOLBOX_TRAIN__BETA=0.5\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMOLBOX_ENV_FILE": str(tmp_path / "project.env")}
    run = subprocess.run([sys.executable, "-m", "smolbox", "config", "--config", "tiny"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "beta: 0.5" in run.stdout, run.stderr
    env["SMOLBOX_ENV_FILE"] = str(tmp_path / "absent.env")
    run = subprocess.run([sys.executable, "-m", "smolbox", "config", "--config", "tiny"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_export_of_a_missing_run_lists_the_runs_there(tmp_path):
    for name, status in (("first", "completed"), ("second", "failed")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "manifest.json").write_text(json.dumps({"status": status}))
    result = smolbox("export", "--config", "tiny", "--env-file", "", "--run.name", "frist", cwd=tmp_path)
    assert result.returncode == 2
    assert "runs/frist: no training run" in result.stderr and "Runs in runs/: first (completed), second (failed)" in result.stderr
    # refused before the export stage's imports: no torch, onnx or transformers loaded for a typo
    code = ("import sys\nfrom smolbox.cli import main\n"
            "assert main(['export', '--config', 'tiny', '--env-file', '', '--run.name', 'frist']) == 2\n"
            "print(sorted(m for m in ('torch', 'onnx', 'transformers') if m in sys.modules))")
    check = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "[]", check.stderr
    from smolbox.sources import SourceError, resolve_source

    with pytest.raises(SourceError, match=f"There are no runs in {tmp_path}/elsewhere/"):
        resolve_source(load_config("tiny", overrides={"run.output_dir": str(tmp_path / "elsewhere")}, env={}, dotenv=None))


def test_every_config_field_has_a_description():
    from smolbox.config import cli_fields

    assert [key for key, info in cli_fields() if not info.description] == []
