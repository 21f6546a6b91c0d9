"""Several processes, one run: what the train stage needs from torch.distributed.

smolbox never starts or connects processes itself. `torchrun` (or `accelerate launch`) starts one process per GPU
and sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; accelerate's PartialState joins the process group
(NCCL on GPUs, gloo on CPU) with the configured timeout, and TRL/transformers use that group for DDP and their
data sharding. A plain `smolbox train` is a world of one, and every helper here is then a no-op.
Rank 0 owns the run folder: the manifest, metrics, checkpoints' completion markers, the adapter.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass


log = logging.getLogger("smolbox.train")


@dataclass(frozen=True)
class World:
    size: int  # processes in the job (WORLD_SIZE)
    rank: int
    local_rank: int  # index on this host: the GPU this process uses
    local_size: int  # processes on this host

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the job, from the variables torchrun / accelerate launch set (a world of one without)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return World(size, int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), local_size)


def start(device: str, timeout_s: float) -> World:
    """Join the job's process group (several processes only) and pin this process to its GPU."""
    w = world()
    import torch

    if w.size == 1 and device == "cuda" and torch.cuda.device_count() > 1:
        n = torch.cuda.device_count()
        log.warning("%d GPUs are visible and this is one process: it trains on cuda:0. To train on all of them: "
                    "torchrun --standalone --nproc_per_node %d -m smolbox train ... (docs/distributed.md)", n, n)
    if w.size > 1:
        from accelerate import PartialState

        if device == "cuda":
            torch.cuda.set_device(w.local_rank)
        # transformers' TrainingArguments later builds the same PartialState (a shared singleton), so the group made
        # here, with this timeout, is the one DDP uses.
        PartialState(cpu=device == "cpu", timeout=datetime.timedelta(seconds=timeout_s))
    return w


def _state():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from accelerate import PartialState

    return PartialState()


def barrier() -> None:
    state = _state()
    if state is not None:
        state.wait_for_everyone()


def gather(value) -> list:
    """Every process's `value` (picklable), in rank order, on every process."""
    state = _state()
    if state is None:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def local_main_first():
    """A context in which the first process of each host runs first (it fills the host's caches), the others after."""
    state = _state()
    return state.local_main_process_first() if state is not None else contextlib.nullcontext()


def backend() -> str | None:
    state = _state()
    return str(state.backend) if state is not None else None


def describe(device: str) -> dict:
    """The job's shape for the manifest: world size, hosts, processes per host, backend and each process's device."""
    import torch

    w = world()
    name = torch.cuda.get_device_name(torch.cuda.current_device()) if device == "cuda" else "cpu"
    per_rank = gather({"rank": w.rank, "host": socket.gethostname(), "local_rank": w.local_rank, "device": name})
    return {"world_size": w.size, "nodes": w.nodes, "processes_per_node": w.local_size, "backend": backend(),
            "ranks": per_rank, "gpus": [r["device"] for r in per_rank] if device == "cuda" else []}
