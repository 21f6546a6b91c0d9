"""Training on several processes through torchrun (torch.distributed, gloo on CPU), on the tiny bundle.

The math must not depend on the number of processes: train.global_batch_size pairs a step, split over however many
processes run. So a 2-process run, and a run killed and resumed with another number of processes, end with the
losses and the adapter of one uninterrupted process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from smolbox.cli import main
from smolbox.train import COMPLETE_MARKER

# torchrun jobs of several fresh processes, each importing the training stack: the slow checks (tests/conftest.py)
pytestmark = pytest.mark.slow

STEPS = 12
SAVE_EVERY = 2
ENTRYPOINT = str(Path(__file__).resolve().parents[2] / "entrypoints" / "train")  # the training image's


def train_args(output_dir: Path, name: str) -> list[str]:
    return ["-m", "smolbox", "train", "--config", "tiny", "--env-file", "", "--run.output_dir", str(output_dir),
            "--run.name", name, "--train.max_steps", str(STEPS), "--train.save_steps", str(SAVE_EVERY),
            "--train.logging_steps", "1", "--data.eval_split", "null", "--train.ddp_timeout_s", "60"]


def env(**extra) -> dict:
    # One thread per process in every run, so that 1- and 2-process runs do the same arithmetic. The entrypoint
    # finds python, torchrun and smolbox on PATH, as in the image.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": path, **extra}


def run(cmd: list[str], log: Path, **extra_env) -> None:
    with log.open("a") as out:
        proc = subprocess.run(cmd, env=env(**extra_env), stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]


def start(cmd: list[str], log: Path, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(**extra_env), stdout=log.open("a"), stderr=subprocess.STDOUT)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    marker = run_dir / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists() and proc.poll() is None, f"no running job at checkpoint {step}:\n" + log.read_text()[-4000:]


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started at once, as a machine that loses power would."""
    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in processes:
        p.kill()
    psutil.wait_procs(processes, timeout=60)
    proc.wait()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    ours, theirs = losses(run_dir), losses(reference)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, theirs)
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, reference))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bundle):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def one_process(runs):
    """The reference: the same arguments trained in this process (one thread, as every run here), without torchrun:
    a process of its own would only add its imports (tests/train/test_stage.py: the CLI and train() give the same
    bits)."""
    assert main(train_args(runs, "one")[2:]) == 0
    return runs / "one"


def host_agents(runs: Path, name: str) -> list[subprocess.Popen]:
    """Two "hosts" on this machine: the image's entrypoint twice with the multi-host variables, so two torchrun
    agents with --nnodes 2 (one process each) meet at a c10d rendezvous on 127.0.0.1. Logs: runs/NAME.hostN.log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [start([ENTRYPOINT, *train_args(runs, name)[3:]], runs / f"{name}.host{node}.log", SMOLBOX_NNODES="2",
                  SMOLBOX_NODE_RANK=str(node), SMOLBOX_RDZV_HOST="127.0.0.1", SMOLBOX_RDZV_PORT=str(port),
                  SMOLBOX_NPROC_PER_NODE="1")
            for node in range(2)]


def test_killed_runs_resume_across_hosts_and_process_counts(runs, one_process):
    """One plain process (the image's entrypoint, asked for one) killed -> resumed on two hosts -> one host's
    process SIGKILLed -> both hosts' jobs end -> resumed by `smolbox train` on one process: the end equals one
    uninterrupted process, to fp32 rounding, and rank 0 alone wrote the run folder."""
    name, log = "resumed", runs / "resumed.log"
    run_dir = runs / name
    command = [ENTRYPOINT, *train_args(runs, name)[3:]]

    job = start(command, log, SMOLBOX_NPROC_PER_NODE="1")
    wait_for_checkpoint(job, run_dir, 2, log)
    assert not any("torchrun" in part for part in psutil.Process(job.pid).cmdline())  # smolbox itself, no launcher
    kill_job(job)

    agents = host_agents(runs, name)
    wait_for_checkpoint(agents[0], run_dir, 6, runs / f"{name}.host0.log")
    m = json.loads((run_dir / "manifest.json").read_text())
    assert (m["distributed"]["world_size"], m["distributed"]["nodes"], m["distributed"]["processes_per_node"]) == (2, 2, 1)
    assert m["status"] == "running" and m["resumed_from"].endswith("checkpoint-2")
    workers = [p for p in psutil.Process(agents[1].pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    killed_at = time.monotonic()
    workers[0].send_signal(signal.SIGKILL)
    for agent in agents:  # neither host hangs: the other host's job ends too, before train.ddp_timeout_s (60 s)
        agent.wait(timeout=120)
        assert agent.returncode != 0
    assert time.monotonic() - killed_at < 60

    assert main(train_args(runs, name)[2:]) == 0  # one plain process, no torchrun: here, in-process
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["global_step"] == STEPS
    assert int(manifest["resumed_from"].rsplit("-", 1)[1]) >= 6
    assert len(manifest["attempts"]) == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter", "checkpoints", "manifest.json", "metrics.jsonl",
                                                         "train.log", "training.png"]
    assert_same_training(run_dir, one_process)


def test_two_processes_with_the_speed_switches_train_like_one(runs, one_process):
    """The image's entrypoint, asked for 2 processes (as with 2 GPUs), runs torchrun --standalone; here with issue
    #16's switches on (train.compile with aot_eager, as on CPU in tests/train/test_compile.py;
    adapter.fused_dora_bias; adapter.dora_norm_cache; gradient checkpointing): DDP's gradient hooks are the eager ones
    around compiled blocks, and the two processes train the one-process run of the switches off, to the rounding those
    switches bring through bitsandbytes' 4-bit CPU kernels (docs/notes.md). Two processes with the
    switches off train it to 1e-5: the resumed run above, on two hosts for a while."""
    switches = ["--train.compile", "true", "--train.compile_backend", "aot_eager", "--adapter.fused_dora_bias", "true",
                "--adapter.dora_norm_cache", "true", "--train.gradient_checkpointing", "true"]
    run([ENTRYPOINT, *train_args(runs, "two")[3:], *switches], runs / "two.log", SMOLBOX_NPROC_PER_NODE="2")
    log = (runs / "two" / "train.log").read_text()
    assert "torch.compile (aot_eager) on" in log and "DoRA norms cached" in log
    compiled = json.loads((runs / "two" / "manifest.json").read_text())["compile"]  # rank 0's: the reference pass too
    assert compiled["graphs"] > 0 and compiled["graph_breaks"] == {}, compiled
    ours, theirs = losses(runs / "two"), losses(one_process)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ours, theirs):
        assert abs(a - b) <= 1e-3 * abs(b), (ours, theirs)
    m = json.loads((runs / "two" / "manifest.json").read_text())
    assert m["status"] == "completed" and m["global_step"] == STEPS
    d = m["distributed"]
    assert (d["world_size"], d["nodes"], d["processes_per_node"], d["backend"]) == (2, 1, 2, "gloo")
    assert [r["rank"] for r in d["ranks"]] == [0, 1]
    assert m["batch"] == {"global": 4, "micro_batch": 2, "accumulation": 1, "processes": 2}
    one = json.loads((one_process / "manifest.json").read_text())["batch"]
    assert one == {"global": 4, "micro_batch": 2, "accumulation": 2, "processes": 1}
    records = [json.loads(line) for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["peak_memory_gb_per_rank"]) == 2 and r["peak_memory_gb"] == max(r["peak_memory_gb_per_rank"])
               for r in records)
    assert all(r["pairs_per_s"] > 0 for r in records if "loss" in r)
    # rank 0 alone writes the run folder: one metrics line per step, one adapter, one log
    assert len([r for r in records if "loss" in r]) == STEPS
