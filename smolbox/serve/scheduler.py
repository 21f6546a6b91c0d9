"""Who starts in each engine step, and the vision features that repeated images reuse.

The engine (smolbox.serve.engine) runs in steps: one decode step for the running rows, then the prefill of the
newcomers this module picks. `Scheduler` holds the waiting requests in arrival order and the KV tokens the running
ones reserved; `plan` is its rule: newcomers fill the room left in the batch in arrival order, within
serve.max_prefill_tokens_per_step of prompt tokens (so the running rows get a decode step between newcomers'
prefills; a first newcomer over it runs alone in its step) and within serve.max_kv_tokens of prompt + max_tokens
over every request in flight (the first one that does not fit waits, and so do those behind it: no overtaking).

`image_parts` names each image of a request: one (key, tiles) pair per image, in the request's worker thread; the
engine encodes the images that the image cache (`LRUCache`) lacks, of every newcomer, in one vision-encoder call.
`prompt_key` names a whole prompt (its tokens and images) for the prompt cache (smolbox.serve.kv_decoder): a
newcomer whose prompt is cached costs no prefill, so it counts no prompt tokens against the step's budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..config import ServeConfig
from ..preprocess import Encoded

if TYPE_CHECKING:
    from .engine import GenRequest


class QueueFull(Exception):
    pass


def kv_tokens(request: GenRequest) -> int:
    """What a request may hold in the KV cache: its prompt and every token it may generate."""
    return request.prompt_tokens + request.max_tokens


def plan(waiting: list[tuple[int, int]], running: int, kv_in_use: int, limits: ServeConfig,
         fits: Callable[[list[int]], bool] = lambda lengths: True) -> int:
    """How many of the waiting requests, (prompt tokens, KV tokens) each in arrival order, start in this step.
    `running` rows hold `kv_in_use` KV tokens; `fits(prompt lengths)` says whether those prompts may prefill as one
    batch (smolbox.serve.engine.prefill_fits). Without continuous batching newcomers cannot join later, so a new
    batch fills up without a prefill budget."""
    budget = limits.max_prefill_tokens_per_step if limits.continuous_batching else float("inf")
    count, prompt = 0, 0
    for prompt_tokens, kv in waiting:
        if running + count >= limits.max_batch_size or kv_in_use + kv > limits.max_kv_tokens:
            break
        lengths = [p for p, _ in waiting[: count + 1]]
        if count and (prompt + prompt_tokens > budget or not fits(lengths)):
            break
        count, prompt, kv_in_use = count + 1, prompt + prompt_tokens, kv_in_use + kv
    return count


class Scheduler:
    """The waiting requests (bounded by serve.max_queue) and the KV tokens reserved by the ones in flight.
    submit() runs on the server's threads, the rest on the engine's."""

    def __init__(self, limits: ServeConfig):
        self.limits = limits
        self._waiting: deque[GenRequest] = deque()
        self._ready = threading.Condition()
        self._reserved: dict[int, int] = {}  # id(request) -> KV tokens, for the requests in flight
        self.kv_in_use = 0

    def submit(self, request: GenRequest) -> None:
        with self._ready:
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull()
            self._waiting.append(request)
            self._ready.notify()

    def waiting(self) -> int:
        return len(self._waiting)

    def wait(self, count: int, timeout: float) -> bool:
        """Wait until `count` requests wait (or `timeout` seconds pass); whether any does."""
        with self._ready:
            self._ready.wait_for(lambda: len(self._waiting) >= count, timeout)
            return bool(self._waiting)

    def take(self, running: int, fits: Callable[[list[int]], bool],
             prefill_tokens: Callable[[GenRequest], int] = lambda r: r.prompt_tokens) -> list[GenRequest]:
        """The newcomers of this step (see `plan`), their KV tokens reserved until release(). `prefill_tokens`: what
        a request's prefill costs of the step's budget (0 for a prompt the prompt cache holds)."""
        with self._ready:
            waiting = [(prefill_tokens(r), kv_tokens(r)) for r in self._waiting]
            count = plan(waiting, running, self.kv_in_use, self.limits, fits)
            taken = [self._waiting.popleft() for _ in range(count)]
        for request in taken:
            self._reserved[id(request)] = kv_tokens(request)
            self.kv_in_use += kv_tokens(request)
        return taken

    def release(self, request: GenRequest) -> None:
        """A request left the batch (finished or failed); releasing it twice changes nothing."""
        self.kv_in_use -= self._reserved.pop(id(request), 0)


# ---- vision features ------------------------------------------------------------------------------------------


def image_parts(encoded: Encoded, identity: bytes) -> list[tuple[bytes, np.ndarray]]:
    """(key, tiles [n, 3, h, w]) for each image of a request (its Encoded.image_pixels, not copied). The key is a
    blake2b hash of the export's identity and the image's digest (preprocess.image_digest: its decoded pixels and
    the tiles' dtype, which with the export's preprocessing settings make the tiles), so an image sent again (a
    later turn of a chat, a retry), in any request, has the same key."""
    return [(hashlib.blake2b(identity + digest, digest_size=16).digest(), pixels)
            for pixels, digest in zip(encoded.image_pixels, encoded.image_digests, strict=True)]


def prompt_key(request: GenRequest) -> bytes:
    """A prompt's key in the prompt cache: a blake2b hash of its token ids and its images' keys (image_parts), so
    the same text with another image is another prompt. Made once per request, on first use."""
    if request.prompt_key is None:
        ids = np.asarray(request.encoded.input_ids, np.int64)
        mask = np.asarray(request.encoded.attention_mask).astype(bool)
        digest = hashlib.blake2b(np.ascontiguousarray(ids[mask]), digest_size=16)
        for key, _ in request.images:
            digest.update(key)
        request.prompt_key = digest.digest()
    return request.prompt_key


class LRUCache:
    """Values by key, least recently used first out, within `max_bytes` of their `nbytes` (0 = keeps nothing): the
    vision features of images (by image key), the KV of prompts (smolbox.serve.kv_decoder.CachedPrompt) and the
    tiles of images (preprocess.TiledImage, used by the request threads at once: hence the lock)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value) -> None:
        with self._lock:
            if value.nbytes > self.max_bytes or key in self._items:
                return
            self._items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes
