"""A request body to model inputs: validation, the chat template, image decoding and tiling, tokenization and the
images' cache keys. Runs off the event loop: in threads of the server process, or with serve.preprocess_workers > 0
in that many worker processes.

Why processes: tiling an image is numpy and PIL work in Python, and threads of the server process share one GIL
with the engine thread, which needs it back every time onnxruntime returns. A worker process has a GIL of its own;
the server gets back the token ids and the images' tiles and keys (pickled: the decoded images stay in the
worker). On an H200 at 32 clients processes lost rate (docs/benchmarks.md, leases 5 and 12): numpy and PIL release
the GIL for most of that work, the event loop holds it most, and each worker's tile cache starts cold; so processes
are off by default.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import ServeConfig
from ..preprocess import Encoded, Preprocessor
from .api import Prompt, validate
from .scheduler import LRUCache, image_parts

Prepared = tuple[Prompt, Encoded, list[tuple[bytes, np.ndarray]]]


def prepare(body, limits: ServeConfig, model_name: str, preprocessor: Preprocessor, identity: bytes) -> Prepared:
    """Validate the request (APIError when it is not valid), then its model inputs and its images' (key, tiles)."""
    prompt = validate(body, limits, model_name)
    text = preprocessor.render_chat(prompt.chat, add_generation_prompt=True)
    encoded = preprocessor.encode(text, prompt.images, pad=False)  # the engine batches the tiles itself
    return prompt, encoded, image_parts(encoded, identity)


def timed_prepare(*args) -> tuple[Prepared, float]:
    """`prepare` and the seconds it took where it ran (a thread or a worker process)."""
    started = time.perf_counter()
    prepared = prepare(*args)
    return prepared, time.perf_counter() - started


class Preparer:
    """`await preparer(body)`: `prepare` in a thread of this process, or in a worker process when `workers` > 0;
    its own time goes to `metrics.prepare_work`. The export's pixel dtype and identity come from the engine once it
    has loaded (they are sent with each call)."""

    def __init__(self, folder: Path, limits: ServeConfig, model_name: str, engine, metrics):
        self.limits, self.model_name, self.engine, self.metrics = limits, model_name, engine, metrics
        self.pool = None
        if limits.preprocess_workers > 0:
            # spawn, not fork: the server process runs threads (the engine, onnxruntime's) that a fork would copy
            # mid-flight.
            self.pool = ProcessPoolExecutor(limits.preprocess_workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(str(folder), limits, model_name))
            for _ in range(limits.preprocess_workers):  # the pool starts a process per task while none is idle: all
                self.pool.submit(int)  # start now, while the model loads, not in the first requests' time

    async def __call__(self, body) -> Prepared:
        engine = self.engine
        if self.pool is None:
            prepared, seconds = await asyncio.to_thread(timed_prepare, body, self.limits, self.model_name, engine.preprocessor, engine.identity)
        else:
            loop = asyncio.get_running_loop()
            dtype = np.dtype(engine.preprocessor.pixel_dtype).name
            prepared, seconds = await loop.run_in_executor(self.pool, _prepare_in_worker, body, dtype, engine.identity)
        self.metrics.prepare_work.observe(seconds)
        return prepared

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


_worker: tuple[Preprocessor, ServeConfig, str] | None = None  # in a worker process: set by _start_worker


def _start_worker(folder: str, limits: ServeConfig, model_name: str) -> None:
    global _worker
    _worker = (tiling_preprocessor(folder, limits), limits, model_name)


def tiling_preprocessor(folder, limits: ServeConfig) -> Preprocessor:
    """The export's Preprocessor with a tile cache of serve.tile_cache_mb (one per process that preprocesses)."""
    preprocessor = Preprocessor(folder)
    preprocessor.tile_cache = LRUCache(int(limits.tile_cache_mb * 2**20)) if limits.tile_cache_mb > 0 else None
    return preprocessor


def _prepare_in_worker(body, pixel_dtype: str, identity: bytes) -> tuple[Prepared, float]:
    preprocessor, limits, model_name = _worker
    preprocessor.pixel_dtype = np.dtype(pixel_dtype)
    (prompt, encoded, parts), seconds = timed_prepare(body, limits, model_name, preprocessor, identity)
    # What the engine reads: the ids and each image's tiles and key (parts), not the decoded images.
    return (replace(prompt, images=[]), encoded, parts), seconds
