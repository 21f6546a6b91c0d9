"""The `verify` preflight stage: check the machine, the software and the inputs before any slow work starts.

Every check reports ok / warn / fail / skip with one line of detail, and a one-line fix when it warns or fails.
`verify` never raises for a failing check: an exception inside a check becomes that check's "fail".
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import tiny
from .config import Config
from .env import hf_hub_cache, resolve_attention, resolve_device

STATUSES = ("ok", "warn", "fail", "skip")
DEFAULT_LOCK = Path(__file__).resolve().parents[1] / "requirements" / "train.lock"
# Oldest Linux driver branch that runs each CUDA major (CUDA minor-version compatibility).
MIN_DRIVER_FOR_CUDA = {12: 525, 13: 580}
# A gaussian 256x256 tensor round-trips through NF4 (and FP4) with well under this relative error on a working
# install (docs/notes.md, "Learned building smolbox"); a broken one is far above.
MAX_4BIT_REL_ERROR = 0.2
CPU_ONLY = "CPU only: no CUDA device; training runs on CPU (fine for the tiny config, far too slow for SmolVLM-Instruct)"


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check '{self.name}': status must be one of {STATUSES}, got {self.status!r}")
        self.detail, self.fix = _one_line(self.detail), _one_line(self.fix)
        if self.status in ("warn", "fail") and not self.fix:
            raise ValueError(f"check '{self.name}' is '{self.status}' without a fix")


@dataclass
class VerifyReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def table(self) -> str:
        ws = max([len("status")] + [len(c.status) for c in self.checks])
        wn = max([len("check")] + [len(c.name) for c in self.checks])
        lines = [f"{'status':<{ws}}  {'check':<{wn}}  detail"]
        for c in self.checks:
            lines.append(f"{c.status:<{ws}}  {c.name:<{wn}}  {c.detail}")
            if c.status in ("warn", "fail"):
                lines.append(f"{'':<{ws}}  {'':<{wn}}  fix: {c.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


@dataclass
class _Target:
    """What every check needs to know, worked out once."""

    cfg: Config
    device: str  # resolve_device(cfg): "cuda" | "cpu"
    has_gpu: bool  # torch sees at least one CUDA device
    timeout_s: float
    lock_file: Path | None


def verify(cfg: Config, lock_file: str | Path | None = None, timeout_s: float = 5.0) -> VerifyReport:
    """Run every preflight check in order; failing checks are reported, never raised."""
    try:
        import torch

        device, has_gpu = resolve_device(cfg), torch.cuda.is_available()
    except Exception:  # a broken torch is reported by the torch check
        device, has_gpu = ("cuda" if cfg.run.device == "cuda" else "cpu"), False
    target = _Target(cfg, device, has_gpu, timeout_s, Path(lock_file) if lock_file is not None else None)
    checks = []
    for name, check, fix in _CHECKS:
        try:
            checks.append(check(target))
        except Exception as exc:
            checks.append(Check(name, "fail", _brief(exc), fix))
    return VerifyReport(checks)


def _check_python(t: _Target) -> Check:
    version = platform.python_version()
    if sys.version_info >= (3, 11):
        return Check("python", "ok", f"Python {version} ({sys.executable})")
    return Check("python", "fail", f"Python {version} is older than 3.11", "install Python >= 3.11 and recreate the virtualenv with it")


def _check_torch(t: _Target) -> Check:
    import torch

    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build (torch.version.cuda is None)"
    return Check("torch", "ok", f"torch {torch.__version__}, {built}")


def _check_cuda(t: _Target) -> Check:
    import torch

    if t.cfg.run.device == "cpu":
        return Check("cuda", "ok", "CPU only: run.device=cpu is configured, CUDA is not used")
    if t.has_gpu:
        return Check("cuda", "ok", f"{torch.cuda.device_count()} CUDA device(s) visible to torch (CUDA {torch.version.cuda})")
    if t.cfg.run.device == "cuda":
        cpu_build = torch.version.cuda is None
        return Check(
            "cuda", "fail",
            "run.device=cuda but torch sees no CUDA device" + (f" (torch {torch.__version__} is a CPU-only build)" if cpu_build else ""),
            ("install a CUDA build of torch, " if cpu_build else "")
            + "expose the GPU (`docker run --gpus all`, needs the NVIDIA Container Toolkit; check `nvidia-smi`) or set run.device=cpu",
        )
    # run.device=auto without a GPU: fine for the embedded tiny model, hopeless for a real one.
    if tiny.is_builtin(t.cfg.model.id):
        return Check("cuda", "ok", CPU_ONLY)
    return Check("cuda", "warn", CPU_ONLY, "run on a GPU (`docker run --gpus all` with the NVIDIA Container Toolkit) or use the tiny config")


def _check_driver(t: _Target) -> Check:
    import torch

    if t.cfg.run.device == "cpu":
        return Check("driver", "skip", "CPU configured: no NVIDIA driver needed")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if t.has_gpu:
            return Check("driver", "ok", "nvidia-smi not found; torch initialised CUDA, so the driver works")
        return Check("driver", "skip", "no nvidia-smi and no CUDA device")
    # A failing nvidia-smi matters only when the run needs the GPU; with auto on CPU it just explains the fallback.
    bad = "warn" if t.device == "cuda" else "skip"
    query = subprocess.run(
        [smi, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=t.timeout_s,
    )
    if query.returncode != 0 or not query.stdout.strip():
        message = (query.stderr or query.stdout).strip() or f"exit code {query.returncode}"
        return Check("driver", bad, f"nvidia-smi failed: {message}", "make `nvidia-smi` work: reinstall the NVIDIA driver or reboot after a driver update; in Docker pass `--gpus all`")
    gpus = [[part.strip() for part in line.split(",")] for line in query.stdout.strip().splitlines()]
    driver, name, memory = gpus[0][:3]
    banner = subprocess.run([smi], capture_output=True, text=True, timeout=t.timeout_s).stdout
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", banner)
    driver_cuda = (int(found.group(1)), int(found.group(2))) if found else None
    supports = f"{driver_cuda[0]}.{driver_cuda[1]}" if driver_cuda else "unknown"
    detail = f"driver {driver} (CUDA <= {supports}), {name}, {memory}" + (f", {len(gpus)} GPUs" if len(gpus) > 1 else "")
    if torch.version.cuda is None:
        return Check("driver", "warn", f"{detail}; but torch is a CPU-only build", "install a CUDA build of torch to use the GPU")
    needed = int(torch.version.cuda.split(".")[0])
    if driver_cuda:
        compatible, driver_cuda_major = driver_cuda[0] >= needed, driver_cuda[0]
    else:  # old drivers print no CUDA version: fall back to the driver-branch table
        driver_major = int(driver.split(".")[0])
        compatible = driver_major >= MIN_DRIVER_FOR_CUDA.get(needed, 0)
        driver_cuda_major = max((c for c, r in MIN_DRIVER_FOR_CUDA.items() if driver_major >= r), default=None)
    if not compatible:
        upgrade = f"upgrade the NVIDIA driver to >= R{MIN_DRIVER_FOR_CUDA[needed]}" if needed in MIN_DRIVER_FOR_CUDA else f"upgrade the NVIDIA driver to one for CUDA {needed}"
        older = f" or use an image built for CUDA {driver_cuda_major}" if driver_cuda_major else ""
        status = "fail" if t.device == "cuda" else "warn"
        return Check("driver", status, f"{detail}; too old for torch built with CUDA {torch.version.cuda}", upgrade + older)
    if not t.has_gpu:
        return Check("driver", "warn", f"{detail}; but torch sees no CUDA device", "check CUDA_VISIBLE_DEVICES and that the container got the GPU (`--gpus all`)")
    return Check("driver", "ok", f"{detail}; runs torch's CUDA {torch.version.cuda}")


def _check_gpu(t: _Target) -> Check:
    import torch

    if t.device != "cuda" or not t.has_gpu:
        return Check("gpu", "skip", "no CUDA device in use")
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    return Check(
        "gpu", "ok",
        f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}"
        + (f" ({count} GPUs: the train entrypoint runs one process on each)" if count > 1 else ""),
    )


# ---- several GPUs and hosts (docs/distributed.md) -------------------------------------------------------------
# The train entrypoint (entrypoints/train) starts SMOLBOX_NPROC_PER_NODE processes (default: every GPU it sees) on
# each of SMOLBOX_NNODES hosts; compose reserves SMOLBOX_GPU_COUNT GPUs. These checks read the same variables.

MIN_SHM_BYTES = 1 << 30  # NCCL's shared-memory transport and DataLoader workers; Docker's default is 64 MiB


def _planned_processes(t: _Target) -> tuple[int, int]:
    """(processes on this host, hosts) that the train entrypoint would start here."""
    import torch

    visible = torch.cuda.device_count() if t.has_gpu and t.device == "cuda" else 0
    local = int(os.environ.get("SMOLBOX_NPROC_PER_NODE") or max(visible, 1))
    return local, int(os.environ.get("SMOLBOX_NNODES") or 1)


def _check_gpu_count(t: _Target) -> Check:
    import torch

    requested = os.environ.get("SMOLBOX_GPU_COUNT", "")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not requested.isdigit():
        return Check("gpu count", "ok" if visible or t.device == "cpu" else "skip",
                     f"{visible} GPU(s) visible" + (" (SMOLBOX_GPU_COUNT=all)" if requested == "all" else ""))
    if visible < int(requested):
        return Check("gpu count", "fail", f"SMOLBOX_GPU_COUNT={requested} but this machine (or container) sees {visible}",
                     "check `nvidia-smi` and the NVIDIA container toolkit (docker info | grep -i nvidia), that no other "
                     "job holds the GPUs, or lower SMOLBOX_GPU_COUNT")
    return Check("gpu count", "ok", f"{visible} GPU(s) visible, {requested} requested")


def _check_global_batch(t: _Target) -> Check:
    from .train import RunError, plan_batches

    local, nodes = _planned_processes(t)
    try:
        plan = plan_batches(t.cfg.train, local * nodes)
    except RunError as exc:
        return Check("global batch", "fail", str(exc), "set train.global_batch_size to a multiple of the number of processes, "
                     "or change SMOLBOX_NPROC_PER_NODE / the GPUs reserved")
    return Check("global batch", "ok", f"{plan.pairs_per_step} pairs a step = {plan.processes} process(es) x micro-batch "
                 f"{plan.micro_batch} x accumulation {plan.accumulation}")


def _check_nccl(t: _Target) -> Check:
    import torch

    local, nodes = _planned_processes(t)
    if t.device != "cuda" or local * nodes == 1:
        return Check("nccl", "skip", "one process: no collective communication")
    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        return Check("nccl", "fail", "this torch build has no NCCL backend", "install the CUDA build of torch from the lock")
    version = ".".join(map(str, torch.cuda.nccl.version()))
    return Check("nccl", "ok", f"NCCL {version} for {local * nodes} processes on {nodes} host(s)")


def _check_shm(t: _Target, path: str = "/dev/shm") -> Check:
    local, _ = _planned_processes(t)
    workers = t.cfg.train.dataloader_num_workers
    if local == 1 and workers == 0:
        return Check("shared memory", "skip", "one process and no loader workers")
    size = shutil.disk_usage(path).total if os.path.isdir(path) else 0
    users = ", ".join(u for u, on in (("NCCL between GPUs", local > 1), (f"{workers} loader workers", workers > 0)) if on)
    if size < MIN_SHM_BYTES:
        return Check("shared memory", "fail", f"{path} holds {size / 2**20:.0f} MiB; {users} need at least "
                     f"{MIN_SHM_BYTES >> 30} GiB", "give the container more: compose's shm_size (16gb in compose.yaml), "
                     "`docker run --shm-size 16g` or `--ipc host`; on Kubernetes an emptyDir with medium: Memory at /dev/shm")
    return Check("shared memory", "ok", f"{path}: {size / 2**30:.1f} GiB ({users})")


def _check_rendezvous(t: _Target) -> Check:
    import socket

    nodes = int(os.environ.get("SMOLBOX_NNODES") or 1)
    if nodes == 1:
        return Check("rendezvous", "skip", "one host")
    host, port = os.environ.get("SMOLBOX_RDZV_HOST", ""), int(os.environ.get("SMOLBOX_RDZV_PORT") or 29500)
    rank = os.environ.get("SMOLBOX_NODE_RANK", "")
    if not host or not rank.isdigit() or int(rank) >= nodes:
        return Check("rendezvous", "fail", f"SMOLBOX_NNODES={nodes} with SMOLBOX_RDZV_HOST={host!r}, SMOLBOX_NODE_RANK={rank!r}",
                     "set SMOLBOX_RDZV_HOST to the address of the first host and SMOLBOX_NODE_RANK to this host's index (0..NNODES-1)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Check("rendezvous", "fail", f"{host} does not resolve: {exc}", "use an IP address or a name every host resolves")
    if int(rank) == 0:
        return Check("rendezvous", "ok", f"host 0 of {nodes}: the others meet this host at {host}:{port}")
    try:
        with socket.create_connection((host, port), timeout=t.timeout_s):
            return Check("rendezvous", "ok", f"host {rank} of {nodes}: {host}:{port} answers")
    except OSError as exc:
        return Check("rendezvous", "warn", f"{host}:{port} does not answer ({_brief(exc)})",
                     "start the job on host 0 first (the others wait for it up to 10 minutes), and open the port between "
                     "the hosts (the containers need host networking: docs/distributed.md)")


def _check_bf16(t: _Target) -> Check:
    import torch

    cfg = t.cfg
    users = [key for key, on in (
        ("train.bf16", cfg.train.bf16),
        ("model.dtype", cfg.model.dtype == "bfloat16"),
        ("quant.compute_dtype", cfg.quant.compute_dtype == "bfloat16"),
    ) if on]
    if not users:
        return Check("bf16", "ok", "bf16 not used")
    using = ", ".join(users)
    if t.device == "cuda":
        if not t.has_gpu:
            return Check("bf16", "skip", f"bf16 wanted by {using}; no CUDA device to ask")
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Check("bf16", "ok", f"bf16 wanted by {using}; the GPU supports it")
        smaller = "set train.bf16=false, model.dtype=float16 and quant.compute_dtype=float16, or use an Ampere or newer GPU"
        if torch.cuda.is_bf16_supported():
            return Check("bf16", "warn", f"bf16 wanted by {using}; this GPU only emulates it (slow)", smaller)
        return Check("bf16", "fail", f"bf16 wanted by {using}; this GPU has none", smaller)
    if cfg.train.bf16:
        # transformers' TrainingArguments refuses bf16 without a bf16-capable GPU.
        return Check(
            "bf16", "fail", "train.bf16=true on CPU: TRL/transformers refuse bf16 training without a bf16 GPU",
            "set train.bf16=false (or SMOLBOX_TRAIN__BF16=false) or run on a GPU with bf16 (Ampere or newer)",
        )
    return Check("bf16", "ok", f"bf16 wanted by {using}: bfloat16 weights on CPU work, slowly")


def _check_bitsandbytes(t: _Target) -> Check:
    quant = t.cfg.quant
    if not quant.load_in_4bit:
        return Check("bitsandbytes 4-bit", "skip", "quant.load_in_4bit=false")
    if t.device == "cuda" and not t.has_gpu:
        return Check("bitsandbytes 4-bit", "skip", "no CUDA device to test on")
    import bitsandbytes
    import bitsandbytes.functional as bnbf
    import torch

    dtype = getattr(torch, quant.compute_dtype)
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(t.device, dtype)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=quant.double_quant, quant_type=quant.quant_type)
    restored = bnbf.dequantize_4bit(packed, state).float()
    error = ((restored - weight.float()).norm() / weight.float().norm()).item()
    detail = (
        f"bitsandbytes {bitsandbytes.__version__}: {quant.quant_type} round trip on {t.device} "
        f"({quant.compute_dtype}, double_quant={quant.double_quant}), relative error {error:.3f}"
    )
    if not math.isfinite(error) or error > MAX_4BIT_REL_ERROR:
        return Check("bitsandbytes 4-bit", "fail", f"{detail} (limit {MAX_4BIT_REL_ERROR})", _BNB_FIX)
    return Check("bitsandbytes 4-bit", "ok", detail)


def _check_attention(t: _Target) -> Check:
    implementation, reason = resolve_attention(t.cfg, t.device)
    if t.cfg.model.attn_implementation == "flash_attention_2" and implementation != "flash_attention_2":
        return Check("attention", "warn", reason, "pip install flash-attn (CUDA only) or set model.attn_implementation=sdpa")
    return Check("attention", "ok", f"{implementation}: {reason}")


_COMPILE_FIX = ("install a C compiler and Python's headers (Debian/Ubuntu: apt-get install gcc g++ python3.11-dev; "
                "the smolbox train image has them), or set train.compile=false")


def _check_compile(t: _Target) -> Check:
    """train.compile with inductor generates code when the first step runs: Triton kernels on CUDA, whose launcher
    is built with a C compiler against Python's headers, or C++ on CPU. Without them step 1 fails after the model
    has loaded and the reference pass has run."""
    train = t.cfg.train
    if not train.compile:
        return Check("compile", "skip", "train.compile is off")
    if train.compile_backend != "inductor":
        return Check("compile", "ok", f"train.compile with backend {train.compile_backend}: no code generation")
    import sysconfig

    if t.device == "cuda":
        kind, compiler = "C", os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")  # Triton's search
    else:
        kind, compiler = "C++", os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = ([f"no {kind} compiler"] if not compiler else []) + ([f"no {header}"] if not header.exists() else [])
    if missing:
        return Check("compile", "fail", f"train.compile generates {'Triton' if t.device == 'cuda' else 'C++'} code at "
                                        f"the first step: {', '.join(missing)}", _COMPILE_FIX)
    return Check("compile", "ok", f"inductor on {t.device}: {kind} compiler {compiler}, {header.parent}")


def _check_disk(t: _Target) -> Check:
    out = Path(t.cfg.run.output_dir).expanduser().absolute()
    need = t.cfg.run.min_free_disk_gb
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return Check("disk", "fail", f"cannot create run.output_dir {out}: {exc}", "set run.output_dir to a writable folder")
    free = shutil.disk_usage(out).free / 1e9
    if free < need:
        return Check(
            "disk", "fail", f"{free:.1f} GB free in {out}, below run.min_free_disk_gb={need:g}",
            "free space on that disk, point run.output_dir at a larger one, or lower run.min_free_disk_gb",
        )
    return Check("disk", "ok", f"{free:.1f} GB free in {out} (need {need:g} GB)")


def _check_hf_cache(t: _Target) -> Check:
    hub = hf_hub_cache(t.cfg)
    try:
        hub.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=hub, prefix=".smolbox-verify-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as exc:
        return Check("hf cache", "fail", f"{hub} is not writable: {exc}", "set run.hf_cache (or HF_HOME) to a writable folder")
    return Check("hf cache", "ok", f"{hub} is writable ({shutil.disk_usage(hub).free / 1e9:.1f} GB free)")


def _check_model(t: _Target) -> Check:
    model_id = t.cfg.model.id
    if tiny.is_builtin(model_id):
        folder = Path(tiny.resolve(model_id, "model"))
        if (folder / "config.json").is_file():
            return Check("model", "ok", f"{model_id}: bundle at {folder}")
        return Check("model", "fail", f"{model_id}: {folder} has no config.json", f"delete {tiny.bundle_dir()} so it is rebuilt")
    return _check_source(t, "model", "model.id", model_id, t.cfg.model.revision, "model")


def _check_data(t: _Target) -> Check:
    data_id = t.cfg.data.id
    if tiny.is_builtin(data_id):
        folder = Path(tiny.resolve(data_id, "data"))
        files = sorted(folder.glob("data/*.parquet"))
        if files:
            return Check("data set", "ok", f"{data_id}: {len(files)} parquet files in {folder}")
        return Check("data set", "fail", f"{data_id}: no parquet files in {folder}", f"delete {tiny.bundle_dir()} so it is rebuilt")
    return _check_source(t, "data set", "data.id", data_id, t.cfg.data.revision, "dataset")


def _check_source(t: _Target, name: str, key: str, ident: str, revision: str | None, repo_type: str) -> Check:
    """A local path, or a hub repo that is cached or at least reachable within timeout_s."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(ident).expanduser()
    if path.exists():
        if repo_type == "model" and not (path / "config.json").is_file():
            return Check(name, "fail", f"local path {path} has no config.json", f"point {key} at a folder written by save_pretrained")
        if path.is_dir() and not any(path.iterdir()):
            return Check(name, "fail", f"local folder {path} is empty", f"point {key} at a data set folder, .parquet or .jsonl file")
        return Check(name, "ok", f"local {'folder' if path.is_dir() else 'file'} {path.absolute()}")
    try:
        validate_repo_id(ident)
    except HFValidationError:
        return Check(name, "fail", f"no such local path: {path}", f"fix {key}: point it at an existing path or a hub id (org/name)")

    hub = hf_hub_cache(t.cfg)
    cached = _cached_snapshot(hub, ident, repo_type, revision, "config.json" if repo_type == "model" else None)
    if cached is not None:
        return Check(name, "ok", f"{ident}: cached in {cached}")
    home = f"HF_HOME={t.cfg.run.hf_cache} " if t.cfg.run.hf_cache else ""
    download = f"`{home}hf download {ident}" + (" --repo-type dataset`" if repo_type == "dataset" else "`")
    fix = f"check the network and HF_TOKEN (private/gated repos), pre-download with {download}, or point {key} at a local folder"
    if _offline():
        return Check(name, "fail", f"{ident}: not in the HF cache ({hub}) and HF_HUB_OFFLINE is set", fix)
    problem = _ask_hub(ident, repo_type, revision, t.timeout_s)
    if problem is None:
        return Check(name, "ok", f"{ident}: reachable on {_endpoint()}, not cached yet (downloaded on first use)")
    return Check(name, "fail", f"{ident}: not in the HF cache and {problem}", fix)


def _cached_snapshot(hub: Path, repo_id: str, repo_type: str, revision: str | None, required: str | None) -> Path | None:
    """The cached snapshot folder of this revision, if it holds `required` (or, without one, any file)."""
    from huggingface_hub.file_download import repo_folder_name

    repo = hub / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    commit = revision or "main"
    ref = repo / "refs" / commit
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if required is not None:
        return snapshot if (snapshot / required).is_file() else None
    return snapshot if any(p.is_file() for p in snapshot.rglob("*")) else None


def _offline() -> bool:
    # Read the environment now: huggingface_hub.constants froze it at import time.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _ask_hub(repo_id: str, repo_type: str, revision: str | None, timeout_s: float) -> str | None:
    """None when the hub answers for this repo, else what went wrong. Returns within timeout_s, whatever the network does."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    endpoint = _endpoint()
    outcome: dict[str, Exception | None] = {}

    def ask() -> None:
        try:
            HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=timeout_s)
            outcome["error"] = None
        except Exception as exc:
            outcome["error"] = exc

    # The HTTP timeout bounds each phase and the client may retry, so only a thread join bounds the total.
    worker = threading.Thread(target=ask, name="smolbox-verify-hub", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "error" not in outcome:
        return f"no answer from {endpoint} within {timeout_s:g} s"
    error = outcome["error"]
    if error is None:
        return None
    if isinstance(error, RevisionNotFoundError):
        return f"the hub has no revision {revision!r}"
    if isinstance(error, RepositoryNotFoundError):
        return "the hub says: not found, private or gated"
    return f"{endpoint} unreachable: {_brief(error)}"


def _check_lock(t: _Target) -> Check:
    from packaging.version import Version

    lock = t.lock_file or DEFAULT_LOCK
    if not lock.is_file():
        if t.lock_file is None:
            return Check("lock", "skip", "no lock file")
        return Check("lock", "fail", f"lock file {lock} not found", "pass an existing lock file")
    pins, hashed = read_lock(lock)
    problems, local = [], []
    for name, specifier in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} missing (lock {specifier})")
            continue
        # PEP 440: '==2.13.0' matches '2.13.0+cpu'; a lock that pins '+cu130' still rejects '+cpu'.
        if not specifier.contains(installed, prereleases=True):
            problems.append(f"{name} {installed} (lock {specifier})")
        elif Version(installed).local:
            local.append(f"{name} {installed} has local part +{Version(installed).local}")
    fix = f"pip install {'--require-hashes ' if hashed else ''}-r {lock}"
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        return Check("lock", "fail", f"{len(problems)} of {len(pins)} pins in {lock} differ: {shown}", fix)
    return Check("lock", "ok", f"{len(pins)} pins in {lock} match" + (f" ({'; '.join(local)})" if local else ""))


def read_lock(path: Path) -> tuple[dict, bool]:
    """{canonical name: SpecifierSet} for the `name==version` pins that apply here, and whether the lock has hashes."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins, hashed = {}, False
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        hashed = hashed or "--hash=" in raw
        line = raw.split(" #")[0].strip().rstrip("\\").strip()
        # Comments, options and pip-compile's `--hash=...` continuation lines carry no pin.
        if not line or line.startswith(("#", "-")):
            continue
        line = line.split(" --")[0]
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise ValueError(f"{path}:{lineno}: not a requirement: {raw.strip()!r} ({exc})") from None
        if req.marker is not None and not req.marker.evaluate():
            continue
        if [s.operator for s in req.specifier] == ["=="]:
            pins[canonicalize_name(req.name)] = req.specifier
    return pins, hashed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _brief(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")[:300]


_BNB_FIX = "reinstall bitsandbytes as pinned in the lock, for this torch's CUDA build (pip install --force-reinstall -r requirements/train.lock)"

# (name, check, fix when the check itself crashes), in report order.
_CHECKS: list[tuple[str, Callable[[_Target], Check], str]] = [
    ("python", _check_python, "install Python >= 3.11 and recreate the virtualenv with it"),
    ("torch", _check_torch, "reinstall torch from the lock (the CPU or CUDA build this machine needs)"),
    ("cuda", _check_cuda, "reinstall torch, or set run.device=cpu"),
    ("driver", _check_driver, "make `nvidia-smi` work (reinstall the NVIDIA driver), or set run.device=cpu"),
    ("gpu", _check_gpu, "check the GPU with `nvidia-smi`, or set run.device=cpu"),
    ("gpu count", _check_gpu_count, "check the GPUs with `nvidia-smi`"),
    ("global batch", _check_global_batch, "set train.global_batch_size to a multiple of the number of processes"),
    ("nccl", _check_nccl, "install the CUDA build of torch from the lock"),
    ("shared memory", _check_shm, "give the container a larger /dev/shm (compose shm_size)"),
    ("rendezvous", _check_rendezvous, "check SMOLBOX_RDZV_HOST / SMOLBOX_RDZV_PORT"),
    ("bf16", _check_bf16, "set train.bf16=false and use float32/float16 dtypes"),
    ("bitsandbytes 4-bit", _check_bitsandbytes, _BNB_FIX),
    ("attention", _check_attention, "set model.attn_implementation=sdpa"),
    ("compile", _check_compile, _COMPILE_FIX),
    ("disk", _check_disk, "set run.output_dir to a writable folder with enough free space"),
    ("hf cache", _check_hf_cache, "set run.hf_cache (or HF_HOME) to a writable folder"),
    ("model", _check_model, "point model.id at builtin:tiny, a local folder with config.json, or a hub id (org/name)"),
    ("data set", _check_data, "point data.id at builtin:tiny, a local data set folder or file, or a hub data set id"),
    ("lock", _check_lock, "regenerate the lock file (one `name==version` per line)"),
]
