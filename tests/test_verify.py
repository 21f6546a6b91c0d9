"""The verify stage, run for real on this machine: no check is mocked, only configs and folders are arranged."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import socket
import time

import pytest
import torch
from packaging.version import Version

from smolbox import verify as verify_module
from smolbox.config import load_config
from smolbox.env import package_versions
from smolbox.verify import Check, verify

NAMES = [
    "python", "torch", "cuda", "driver", "gpu", "gpu count", "global batch", "nccl", "shared memory", "rendezvous",
    "bf16", "bitsandbytes 4-bit", "attention", "compile", "disk", "hf cache",
    "model", "data set", "lock",
]
HUB_MODEL = "HuggingFaceTB/SmolVLM-Instruct"
HUB_DATA = "HuggingFaceH4/rlaif-v_formatted"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tiny_bundle):
    """The session's tiny bundle (a build pretrains for a minute: one per machine, see conftest.py)."""
    yield


@pytest.fixture(autouse=True)
def no_hub_settings(monkeypatch):
    # The checkout ships no requirements/train.lock (the training image's copy of its lock): without lock_file the
    # lock check skips here, whatever the test.
    assert not verify_module.DEFAULT_LOCK.exists()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


def tiny_cfg(tmp_path, overrides=None):
    base = {"run.output_dir": str(tmp_path / "runs"), "run.hf_cache": str(tmp_path / "hf")}
    return load_config("tiny", overrides={**base, **(overrides or {})}, env={}, dotenv=None)


def check(report, name) -> Check:
    return next(c for c in report.checks if c.name == name)


def assert_well_formed(report):
    assert [c.name for c in report.checks] == NAMES
    lines = report.table().splitlines()
    for name in NAMES:
        assert any(re.match(rf"^\S+\s+{re.escape(name)}\s", line) for line in lines), name
    for c in report.checks:
        if c.status in ("warn", "fail"):
            assert c.fix.strip()
            row = next(i for i, line in enumerate(lines) if re.match(rf"^{c.status}\s+{re.escape(c.name)}\s", line))
            assert lines[row + 1].strip() == f"fix: {c.fix}"
    assert report.ok == all(c.status != "fail" for c in report.checks)
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()


def test_tiny_config_passes_on_cpu(tmp_path):
    report = verify(tiny_cfg(tmp_path))
    assert_well_formed(report)
    assert report.ok, report.table()
    assert "CPU only" in check(report, "cuda").detail
    bnb = check(report, "bitsandbytes 4-bit")
    assert bnb.status == "ok"
    error = float(re.search(r"relative error (\d+\.\d+)", bnb.detail).group(1))
    assert 0.0 < error < 0.2
    assert check(report, "lock").status == "skip" and check(report, "lock").detail == "no lock file"
    assert (tmp_path / "runs").is_dir()
    assert report.to_dict()["ok"] is True


@no_gpu
def test_auto_device_without_gpu_is_ok_for_tiny_and_warns_for_real_model(tmp_path, monkeypatch):
    report = verify(tiny_cfg(tmp_path, {"run.device": "auto"}))
    assert check(report, "cuda").status == "ok"
    assert check(report, "cuda").detail.startswith("CPU only: no CUDA device; training runs on CPU")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = verify(tiny_cfg(tmp_path, {"run.device": "auto", "model.id": HUB_MODEL}))
    assert_well_formed(report)
    assert check(report, "cuda").status == "warn"
    assert "far too slow for SmolVLM-Instruct" in check(report, "cuda").detail


@no_gpu
def test_cuda_requested_without_gpu_fails(tmp_path):
    report = verify(tiny_cfg(tmp_path, {"run.device": "cuda"}))
    assert_well_formed(report)
    assert not report.ok
    cuda = check(report, "cuda")
    assert cuda.status == "fail"
    assert "--gpus all" in cuda.fix and "run.device=cpu" in cuda.fix
    assert "fix: " + cuda.fix in report.table()


def test_bf16_training_on_cpu_fails(tmp_path):
    report = verify(tiny_cfg(tmp_path, {"train.bf16": True}))
    assert_well_formed(report)
    bf16 = check(report, "bf16")
    assert bf16.status == "fail"
    assert "train.bf16=false" in bf16.fix
    assert not report.ok


def test_compile_needs_a_compiler_and_python_headers(tmp_path, monkeypatch):
    assert check(verify(tiny_cfg(tmp_path)), "compile").status == "skip"  # tiny.yaml: train.compile off
    report = verify(tiny_cfg(tmp_path, {"train.compile": True}))
    assert check(report, "compile").status == "ok", check(report, "compile")  # this machine builds inductor's C++
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    report = verify(tiny_cfg(tmp_path, {"train.compile": True}))
    assert_well_formed(report)
    compile_check = check(report, "compile")
    assert compile_check.status == "fail" and "no C++ compiler" in compile_check.detail
    assert "train.compile=false" in compile_check.fix and not report.ok
    assert check(verify(tiny_cfg(tmp_path, {"train.compile": True, "train.compile_backend": "aot_eager"})), "compile").status == "ok"


def test_lock_mismatch_fails_naming_the_package(tmp_path):
    numpy = importlib.metadata.version("numpy")
    lock = tmp_path / "train.lock"
    lock.write_text(
        "# generated by hand\n"
        "numpy==0.0.1 \\\n"
        "    --hash=sha256:0000000000000000000000000000000000000000000000000000000000000000\n"
        f"PyYAML=={importlib.metadata.version('pyyaml')}  # a comment\n"
        "not-installed-anywhere==1.0 ; sys_platform == 'nonexistent'\n"
    )
    report = verify(tiny_cfg(tmp_path), lock_file=lock)
    assert_well_formed(report)
    result = check(report, "lock")
    assert result.status == "fail"
    assert f"numpy {numpy}" in result.detail and "1 of 2 pins" in result.detail
    assert result.fix == f"pip install --require-hashes -r {lock}"


def test_lock_matching_installed_versions_passes(tmp_path):
    installed = {name: v for name, v in package_versions().items() if v}
    # The lock pins torch's public version; the installed one may carry a local part such as +cpu.
    installed["torch"] = Version(torch.__version__).public
    lines = [f"{name.replace('-', '_').upper()}=={version}" for name, version in installed.items()]
    lock = tmp_path / "train.lock"
    lock.write_text("\n".join(lines) + "\n")
    result = check(verify(tiny_cfg(tmp_path), lock_file=lock), "lock")
    assert result.status == "ok", result.detail
    assert f"{len(installed)} pins" in result.detail
    if Version(torch.__version__).local:
        assert f"+{Version(torch.__version__).local}" in result.detail


def test_missing_explicit_lock_fails(tmp_path):
    result = check(verify(tiny_cfg(tmp_path), lock_file=tmp_path / "nope.lock"), "lock")
    assert result.status == "fail" and result.fix


def test_disk_below_minimum_fails(tmp_path):
    report = verify(tiny_cfg(tmp_path, {"run.min_free_disk_gb": 1e9}))
    assert_well_formed(report)
    disk = check(report, "disk")
    assert disk.status == "fail" and "run.min_free_disk_gb" in disk.fix


def test_unwritable_places_fail(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    report = verify(tiny_cfg(tmp_path, {"run.output_dir": str(blocker / "runs"), "run.hf_cache": str(blocker / "hf")}))
    assert_well_formed(report)
    assert check(report, "disk").status == "fail"
    assert check(report, "hf cache").status == "fail"


def test_hub_model_offline_and_not_cached_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    report = verify(tiny_cfg(tmp_path, {"model.id": HUB_MODEL, "data.id": HUB_DATA}))
    assert time.monotonic() - start < 5
    assert_well_formed(report)
    for name, download in (("model", f"hf download {HUB_MODEL}`"), ("data set", f"hf download {HUB_DATA} --repo-type dataset")):
        result = check(report, name)
        assert result.status == "fail"
        assert "HF_HUB_OFFLINE" in result.detail
        assert download in result.fix and "HF_TOKEN" in result.fix


def test_hub_repos_in_the_cache_are_ok_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hf" / "hub"
    for folder, file in (("models--HuggingFaceTB--SmolVLM-Instruct", "config.json"), ("datasets--HuggingFaceH4--rlaif-v_formatted", "data/train-0.parquet")):
        (hub / folder / "refs").mkdir(parents=True)
        (hub / folder / "refs" / "main").write_text("0123abc")
        (hub / folder / "snapshots" / "0123abc" / file).parent.mkdir(parents=True)
        (hub / folder / "snapshots" / "0123abc" / file).write_text("{}")
    report = verify(tiny_cfg(tmp_path, {"model.id": HUB_MODEL, "data.id": HUB_DATA}))
    assert check(report, "model").status == "ok" and "cached" in check(report, "model").detail
    assert check(report, "data set").status == "ok" and "cached" in check(report, "data set").detail
    # Another revision is not cached.
    report = verify(tiny_cfg(tmp_path, {"model.id": HUB_MODEL, "model.revision": "v2"}))
    assert check(report, "model").status == "fail"


def test_silent_hub_is_given_up_after_timeout(tmp_path, monkeypatch):
    # A socket that accepts connections (in the kernel's backlog) but never answers.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        data = tmp_path / "prefs.jsonl"
        data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
        start = time.monotonic()
        report = verify(tiny_cfg(tmp_path, {"model.id": HUB_MODEL, "data.id": str(data)}), timeout_s=1.0)
        elapsed = time.monotonic() - start
    assert elapsed < 4, elapsed
    model = check(report, "model")
    assert model.status == "fail" and "127.0.0.1" in model.detail and model.fix
    assert check(report, "data set").status == "ok"


def test_local_paths(tmp_path):
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check(verify(tiny_cfg(tmp_path, {"model.id": str(good)})), "model").status == "ok"
    assert check(verify(tiny_cfg(tmp_path, {"model.id": str(empty)})), "model").status == "fail"
    assert check(verify(tiny_cfg(tmp_path, {"data.id": str(empty)})), "data set").status == "fail"
    # Not a valid hub id either, so no network is tried.
    missing = check(verify(tiny_cfg(tmp_path, {"model.id": str(tmp_path / "nope")})), "model")
    assert missing.status == "fail" and "no such local path" in missing.detail and missing.fix


def test_a_crashing_check_becomes_a_fail(tmp_path):
    report = verify(tiny_cfg(tmp_path, {"model.id": "builtin:nope"}))
    assert_well_formed(report)
    model = check(report, "model")
    assert model.status == "fail" and model.detail.startswith("ValueError: unknown builtin") and model.fix


def test_check_needs_a_fix_when_it_warns_or_fails():
    with pytest.raises(ValueError):
        Check("x", "warn", "detail")
    with pytest.raises(ValueError):
        Check("x", "bad", "detail", "fix")
    assert Check("x", "ok", "two\nlines").detail == "two lines"


# ---- several GPUs and hosts: the variables the train entrypoint reads -----------------------------------------


@no_gpu
def test_requested_gpus_that_are_not_visible_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLBOX_GPU_COUNT", "2")
    c = check(verify(tiny_cfg(tmp_path, {"run.device": "auto"})), "gpu count")
    assert c.status == "fail" and "SMOLBOX_GPU_COUNT=2 but this machine (or container) sees 0" in c.detail
    assert "nvidia-smi" in c.fix


def test_a_global_batch_that_does_not_split_over_the_processes_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLBOX_NPROC_PER_NODE", "3")
    c = check(verify(tiny_cfg(tmp_path)), "global batch")
    assert c.status == "fail" and "cannot be split evenly over 3 processes" in c.detail
    monkeypatch.setenv("SMOLBOX_NPROC_PER_NODE", "2")
    c = check(verify(tiny_cfg(tmp_path)), "global batch")
    assert c.status == "ok" and c.detail == "4 pairs a step = 2 process(es) x micro-batch 2 x accumulation 1"


def test_shared_memory_is_checked_where_processes_or_workers_use_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLBOX_NPROC_PER_NODE", "2")
    target = verify_module._Target(tiny_cfg(tmp_path), "cpu", False, 1.0, None)
    c = verify_module._check_shm(target)  # this machine's /dev/shm
    assert c.status == ("ok" if shutil.disk_usage("/dev/shm").total >= verify_module.MIN_SHM_BYTES else "fail")
    c = verify_module._check_shm(target, str(tmp_path / "absent"))
    assert c.status == "fail" and "NCCL between GPUs" in c.detail and "shm_size" in c.fix
    monkeypatch.setenv("SMOLBOX_NPROC_PER_NODE", "1")
    assert verify_module._check_shm(target, str(tmp_path / "absent")).status == "skip"


def test_rendezvous_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLBOX_NNODES", "2")
    c = check(verify(tiny_cfg(tmp_path)), "rendezvous")
    assert c.status == "fail" and "SMOLBOX_RDZV_HOST" in c.fix
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("SMOLBOX_RDZV_HOST", "127.0.0.1")
        monkeypatch.setenv("SMOLBOX_RDZV_PORT", str(port))
        monkeypatch.setenv("SMOLBOX_NODE_RANK", "1")
        c = check(verify(tiny_cfg(tmp_path)), "rendezvous")
        assert c.status == "ok" and f"127.0.0.1:{port} answers" in c.detail
    c = check(verify(tiny_cfg(tmp_path)), "rendezvous")  # the listener is gone
    assert c.status == "warn" and "start the job on host 0 first" in c.fix
    monkeypatch.setenv("SMOLBOX_RDZV_HOST", "no-such-host.invalid")
    assert check(verify(tiny_cfg(tmp_path)), "rendezvous").status == "fail"
