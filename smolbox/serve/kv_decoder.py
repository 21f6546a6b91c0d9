"""The server's decoder runtime: the derived GroupQueryAttention decoder (smolbox.serve.derive) over one fixed-capacity
KV buffer per layer, a slot per row: joining is a prefill into a free slot, leaving frees the slot, and nothing
is copied (the published decoder copies the whole cache every step and on every join and leave).

On CUDA the decode step can run as a CUDA graph (`SlotVLM.cuda_graph`), one per batch bucket: the buckets are the
powers of two below the slot count and the slot count itself, and a step over the slots 0 .. highest row's runs the
smallest bucket that holds them (slots are taken lowest first, so one row runs bucket 1, not every slot). Slots are
slot-major in every layer's buffer, so a bucket of k binds the first k slots of the same memory with shape [k, ...]
(no copy); each bucket has its own fixed input/output buffers and its own `gpu_graph_id` (the bucket size). Every
bucket's graph is captured when the model loads (`capture_graphs`: each bucket's step run a few times, as onnxruntime
captures an id only after regular runs of it), so no capture falls inside a request; later steps replay. Capacity is
fixed.

A decode step's greedy tokens come from the derived graph's ArgMax; a step's logits are copied only when read (a
sampling row), before that bucket's next step overwrites its buffer (SlotStep).

The prompt cache (serve.prompt_cache_mb, LRU): after a prefill the engine keeps each new prompt's KV, every layer's
keys and values up to its length, in device memory with its last logits (`remember`); a newcomer with the same
prompt (scheduler.prompt_key: its tokens and images) takes a free slot and gets that KV copied into its first
positions (`reuse`), its first logits the cached ones, and no prefill at all. Reuse is exact: the slot holds what the
prompt's own prefill left there.

No torch here: the serving image runs this module.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_layout import IR_VERSION, ONNX_FLOAT, OPSET, ORT_TO_NUMPY, PAST, PRESENT, graph_path
from ..runtime import OnnxVLM, bind_input, default_providers, dims, session_options, with_cuda_options
from .derive import LAST_INDEX, NEXT_TOKEN, Derived, NotDerivable, derive, vision_without_mask
from .scheduler import LRUCache

log = logging.getLogger("smolbox.serve")

EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"  # onnxruntime session config key
# Runs of each graph id at load: onnxruntime's CUDA provider wants regular runs of an id before it captures it (1 or 2,
# by version: memory is allocated first), and its session may itself repeat a run until captured; later runs replay.
GRAPH_CAPTURE_RUNS = 3
UNMASKED_VISION = "vision_encoder.unmasked"  # SlotVLM's session of derive.vision_without_mask's graph
PREFILL_SCRATCH_BYTES = 2**30  # CPU: attention scores one batched prefill call may hold (SlotVLM._prefill_calls)



class SlotStep:
    """The engine's view of a running batch on slots: the slot each row owns, each row's greedy token (`greedy`) and
    its last-position logits (`logits`, [B, V] float32). A CUDA-graph decode step brings only the greedy tokens to
    the host (the graph's ArgMax); `logits` copies the rows' logits from the graph's output buffer when first read,
    which must happen before that bucket's next step overwrites it (the engine samples a step's rows before the
    next step)."""

    def __init__(self, slots: list[int], logits: np.ndarray | None = None, greedy: np.ndarray | None = None,
                 fetch=None):
        if logits is None and fetch is None:
            raise ValueError("a step needs its logits or a way to fetch them")
        self.slots, self._logits, self._greedy, self._fetch = slots, logits, greedy, fetch

    @property
    def logits(self) -> np.ndarray:
        if self._logits is None:
            self._logits = self._fetch()
        return self._logits

    @property
    def greedy(self) -> np.ndarray:
        """[B] int64: each row's argmax."""
        if self._greedy is None:
            self._greedy = self.logits.argmax(-1).astype(np.int64)
        return self._greedy

    def take(self, rows: list[int]) -> SlotStep:
        """These rows of the step, in this order (logits still fetched only when read)."""
        return SlotStep([self.slots[i] for i in rows], None if self._logits is None else self._logits[rows],
                        None if self._greedy is None else self._greedy[rows], lambda: self.logits[rows])

    @staticmethod
    def join(a: SlotStep, b: SlotStep) -> SlotStep:
        logits = None if a._logits is None or b._logits is None else np.concatenate([a._logits, b._logits])
        return SlotStep(a.slots + b.slots, logits, np.concatenate([a.greedy, b.greedy]),
                        lambda: np.concatenate([a.logits, b.logits]))


@dataclass
class CachedPrompt:
    """A prompt's KV (each layer's keys and values up to the prompt's length, [1, heads, length, head_dim] in the
    decoder's device memory) and its last position's logits: what a prefill of it leaves in a slot."""

    kv: list  # onnxruntime OrtValue per cache input, in SlotVLM.cache_names order
    length: int
    logits: np.ndarray  # [V] float32
    nbytes: int


class SlotVLM(OnnxVLM):
    """OnnxVLM with the derived decoder: `slots` rows of at most `capacity` tokens each. The engine-facing methods
    keep OnnxVLM's names and meaning (prefill, decode, select, merge, release; generate is OnnxVLM's), so the engine
    calls the same methods whichever runtime is loaded; here prefill takes free slots, select and release free
    them, merge only joins lists. On the CPU the buffers are zeroed numpy arrays (pages are only backed once
    written); on CUDA zeroed device memory, all of it allocated at load."""

    def __init__(self, folder, variant: str, derived: Derived, slots: int, capacity: int, providers=None,
                 session_config: dict[str, str] | None = None, cuda_graph: bool = True, batch_prefill: bool = True,
                 prompt_cache_bytes: int = 0, prefill_dequantized: bool = False, attention_kernel: int = 1):
        self.derived, self.slots, self.batch_prefill = derived, slots, batch_prefill
        # serve.attention_kernel: onnxruntime's sdpa_kernel for the decoder (0 = its choice). Flash by default: a
        # 1,102-token prefill a little faster than memory-efficient, decode steps the same (its XQA decoding kernel
        # either way), and no per-length planning as with cuDNN (docs/benchmarks.md, 2026-12-01 leases 9 and 10).
        self.attention_kernel = attention_kernel
        self._session_config = session_config or {}
        self.prompt_cache = LRUCache(prompt_cache_bytes)  # prompt_key -> CachedPrompt (remember, reuse)
        self._keep_session = None
        self.capacity = min(capacity, derived.positions)
        self.want_cuda_graph = cuda_graph
        self.cuda_graph = False
        super().__init__(folder, variant, providers, session_config)
        self.bind_io = self.on_cuda
        # Tiles without padding go through the vision encoder without its mask (derive.vision_without_mask), a
        # second session that holds the vision weights again.
        self.unmasked_vision = self._load_unmasked_vision()
        self.prefill_multiple = 1  # no mask: MultiHeadAttention's kernel choice (runtime.pad_prompt) does not apply
        past = {i.name: i for i in self.sessions["decoder_model_merged"].get_inputs() if i.name.startswith(PAST)}
        self.cache_names = list(past)
        self.cache_dtype = ORT_TO_NUMPY[past[self.cache_names[0]].type]
        shape = (slots, derived.heads, self.capacity, derived.head_dim)
        self.slot_shape = (1, *shape[1:])
        self.slot_bytes = int(np.prod(self.slot_shape)) * np.dtype(self.cache_dtype).itemsize
        self.buffers, self.pointers = {}, {}
        for name in self.cache_names:
            if self.on_cuda:
                import onnxruntime as ort

                # Zeroed: positions past a row's length are masked, and masked garbage (NaN) times 0 is still NaN.
                self.buffers[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype), "cuda", 0)
                self.pointers[name] = self.buffers[name].data_ptr()
            else:
                self.buffers[name] = np.zeros(shape, self.cache_dtype)
                self.pointers[name] = self.buffers[name].ctypes.data
        self.lengths = np.zeros(slots, np.int32)  # tokens in each slot's cache
        self.free = set(range(slots))
        # CUDA-graph batch buckets: powers of two below the slot count, and the slot count
        self.buckets = sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})
        self._graphs: dict[int, dict] = {}  # bucket -> its fixed-buffer binding, made by capture_graphs at load
        self.capture_s = self.capture_graphs()  # seconds; 0 without a CUDA graph
        # serve.prefill_dequantized: prefills through a second session with the 4-bit weights dequantized (dequant.py)
        self.prefill_session, self._prefill_weights = (self._dequantized_prefill_session() if prefill_dequantized else (None, []))
        if self.on_cuda and self.prompt_cache.max_bytes:
            try:
                _cudart()
            except RuntimeError as exc:
                log.warning("serve: prompt cache off: %s", exc)
                self.prompt_cache.max_bytes = 0

    def _session(self, graph: str, options, providers):
        if graph != "decoder_model_merged":
            return super()._session(graph, options, providers)
        import onnxruntime as ort

        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(graph_path(self.folder, graph, self.variant).parent))
        data = self.derived.model.SerializeToString()
        providers = self._decoder_providers(providers)
        if self.want_cuda_graph and any(isinstance(p, tuple) and p[0] == "CUDAExecutionProvider" for p in providers):
            graphed = self._decoder_providers(providers, enable_cuda_graph="1")
            try:
                session = ort.InferenceSession(data, options, providers=graphed)
                self.cuda_graph = session.get_providers()[0] == "CUDAExecutionProvider"
                return session
            except Exception as exc:  # noqa: BLE001 - e.g. a node without a CUDA kernel: no graph, same results
                log.warning("serve: CUDA graph for the decode step unavailable (%s); decoding without", exc)
        return ort.InferenceSession(data, options, providers=providers)

    def _load_unmasked_vision(self) -> bool:
        """The vision encoder without its attention mask as session UNMASKED_VISION; False when the export's has no
        mask to leave out."""
        import onnxruntime as ort

        path = graph_path(self.folder, "vision_encoder", self.variant)
        model = vision_without_mask(onnx.load(str(path), load_external_data=False))
        if model is None:
            return False
        options = session_options({**self._session_config, EXTERNAL_DATA_FOLDER: str(path.parent)})
        self.sessions[UNMASKED_VISION] = ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)
        self.input_types[UNMASKED_VISION] = self.input_types["vision_encoder"]
        return True

    def vision_graph(self, pixel_attention_mask: np.ndarray) -> str:
        """UNMASKED_VISION when no tile has padding (every tile's pixel mask all true, tiles that are all padding
        aside), which makes the export's attention mask all zeros; else the export's vision encoder."""
        if self.unmasked_vision:
            mask = np.asarray(pixel_attention_mask, bool)
            if mask.all():
                return UNMASKED_VISION
            tiles = mask.reshape(-1, *mask.shape[-2:])
            if tiles[tiles.any(axis=(1, 2))].all():
                return UNMASKED_VISION
        return "vision_encoder"

    def _decoder_providers(self, providers, **extra) -> list:
        """`providers` with the derived decoder's CUDA options: runtime.with_cuda_options with serve.attention_kernel
        as sdpa_kernel (none at 0: onnxruntime chooses) and `extra`."""
        kernel = str(self.attention_kernel) if self.attention_kernel else None
        return [with_cuda_options(p, sdpa_kernel=kernel, **extra) for p in providers]

    def _dequantized_prefill_session(self):
        """(session, its weights as OrtValues, which must outlive it) of the derived decoder with its MatMulNBits
        dequantized, on the decoder's providers without a CUDA graph; (None, []) when the variant has none."""
        import onnxruntime as ort

        from .dequant import dequantize_matmuls

        folder = graph_path(self.folder, "decoder_model_merged", self.variant).parent
        dequantized = dequantize_matmuls(self.derived.model, folder)
        if not dequantized.count:
            log.info("serve: serve.prefill_dequantized: %s has no 4-bit MatMulNBits; prefills use the decoder", self.variant)
            return None, []
        options = session_options({**self._session_config, EXTERNAL_DATA_FOLDER: str(folder)})
        names = list(dequantized.weights)
        # Host arrays: onnxruntime takes external initializers only in buffers the caller owns (an OrtValue it
        # allocated on the device is refused), and copies them to the decoder's device when the session starts.
        values = [ort.OrtValue.ortvalue_from_numpy(dequantized.weights.pop(name)) for name in names]
        options.add_external_initializers(names, values)
        session = ort.InferenceSession(dequantized.model.SerializeToString(), options, providers=self._decoder_providers(self.providers))
        log.info("serve: prefills through a decoder with %d MatMulNBits dequantized (%.2f GiB of %s weights)", dequantized.count,
                 sum(v.shape()[0] * v.shape()[1] for v in values) * np.dtype(self.cache_dtype).itemsize / 2**30,
                 np.dtype(self.cache_dtype).name)
        return session, values

    # ---- slots ----

    def _bind_slots(self, binding, first: int, count: int) -> None:
        """Slots first .. first+count-1 of every layer's buffer, as past input and as present output (in place)."""
        shape = (count, *self.slot_shape[1:])
        for name in self.cache_names:
            pointer = self._slot_pointer(name, first)
            binding.bind_input(name, self.device, 0, self.cache_dtype, shape, pointer)
            binding.bind_output(name.replace(PAST, PRESENT), self.device, 0, self.cache_dtype, shape, pointer)

    def _run_decoder(self, embeds, seqlens: np.ndarray, first: int, last: np.ndarray | None = None) -> np.ndarray:
        """One decoder call over slots first .. first+len(seqlens)-1: a decode step (one position, `last` None) or a
        prefill of right-padded prompts into empty slots (`seqlens` = lengths - 1, `last` the same: each row's logits
        at its own last token). Returns [rows, vocab] float32."""
        import onnxruntime as ort

        positions = dims(embeds)[1]
        prefill = positions > 1 and self.prefill_session is not None
        session = self.prefill_session if prefill else self.sessions["decoder_model_merged"]
        binding = session.io_binding()
        bind_input(binding, "inputs_embeds", embeds, self.input_types["decoder_model_merged"]["inputs_embeds"])
        binding.bind_cpu_input("seqlens_k", seqlens)
        # A prompt (several positions) must give the padded length: GroupQueryAttention takes sequence length ==
        # total_sequence_length as a first prompt, where each row starts at position 0 of its slot.
        total = positions if positions > 1 else seqlens.max() + 1
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_cpu_input(LAST_INDEX, np.zeros(len(seqlens), np.int64) if last is None else last.astype(np.int64))
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the order of binding
        self._bind_slots(binding, first, len(seqlens))
        options = ort.RunOptions()
        if self.cuda_graph and not prefill:
            options.add_run_config_entry("gpu_graph_id", "-1")  # prefill: shapes vary, never captured
        session.run_with_iobinding(binding, options)
        return binding.get_outputs()[0].numpy()[:, -1].astype(np.float32)

    def prefill(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, image_features=None) -> SlotStep:
        """Each row (left padding dropped) into a free slot of its own (`_take`, in row order). Rows whose slots are
        consecutive go in one decoder call, right-padded to the run's longest prompt: GroupQueryAttention
        places each row's tokens from position 0 of its slot and is causal, so padding after a row's last token does
        not change that row, and `last_index` picks each row's logits at its own last token. The padding positions'
        keys and values land in the slot past its length, where the row's next steps overwrite them before reading."""
        rows = input_ids.shape[0]
        if rows > len(self.free):
            raise RuntimeError(f"{rows} requests for {len(self.free)} free KV slots")
        attention_mask = np.asarray(attention_mask).astype(bool)
        lengths = attention_mask.sum(axis=1)
        if int(lengths.max()) >= self.capacity:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens leaves no room in a KV slot of {self.capacity}")
        embeds = self.embed(np.asarray(input_ids), pixel_values, pixel_attention_mask, image_features)
        taken = self._take(rows)
        self.free.difference_update(taken)
        calls = self._prefill_calls(taken, lengths)
        # One call of unpadded rows (a lone newcomer, as for a time to first token alone) takes the embeddings as
        # they are, on the device; otherwise rows are cut on the host and onnxruntime copies each call's back.
        whole = calls == [(0, rows)] and bool(attention_mask.all())
        if not whole and not isinstance(embeds, np.ndarray):
            embeds = embeds.numpy()
        logits = []
        try:
            for start, stop in calls:
                count, longest = stop - start, int(lengths[start:stop].max())
                run = embeds
                if not whole:
                    run = np.zeros((count, longest, embeds.shape[-1]), embeds.dtype)
                    for i, row in enumerate(range(start, stop)):
                        run[i, :lengths[row]] = embeds[row, attention_mask[row]]
                last = (lengths[start:stop] - 1).astype(np.int32)
                logits.append(self._run_decoder(run, last, taken[start], last))
                self.lengths[taken[start:stop]] = lengths[start:stop]
        except Exception:
            self._free(taken)
            raise
        return SlotStep(taken, np.concatenate(logits))

    # ---- prompt cache ----

    def remember(self, keys: list[bytes], step: SlotStep) -> int:
        """Keep the KV and last logits of these freshly prefilled rows (`keys[i]` names row i of `step`, a prefill's
        step) in the prompt cache, those it has not yet and that fit in it. Returns how many it kept."""
        kept = 0
        for key, slot, logits in zip(keys, step.slots, step.logits):
            length = int(self.lengths[slot])
            nbytes = length * self.slot_bytes // self.capacity * len(self.cache_names)
            if key in self.prompt_cache or nbytes > self.prompt_cache.max_bytes:
                continue
            binding = self._keep_binding()
            for i, name in enumerate(self.cache_names):
                binding.bind_input(f"slot{i}", self.device, 0, self.cache_dtype, self.slot_shape, self._slot_pointer(name, slot))
                binding.bind_output(f"prompt{i}", self.device)
            binding.bind_cpu_input("length", np.array([length], np.int64))
            self._keep_session.run_with_iobinding(binding)
            self.prompt_cache.put(key, CachedPrompt(binding.get_outputs(), length, np.array(logits, np.float32), nbytes))
            kept += 1
        return kept

    def reuse(self, keys: list[bytes]) -> SlotStep:
        """Newcomers whose prompts the prompt cache holds: each takes a free slot, its cached KV is copied into the
        slot's first positions (`_write_prompt`) and its cached logits are its step's; no prefill."""
        prompts = [self.prompt_cache.get(key) for key in keys]
        if any(p is None for p in prompts):
            raise KeyError("a prompt is not in the prompt cache")
        if len(keys) > len(self.free):
            raise RuntimeError(f"{len(keys)} requests for {len(self.free)} free KV slots")
        taken = self._take(len(keys))
        self.free.difference_update(taken)
        try:
            for slot, prompt in zip(taken, prompts):
                self._write_prompt(slot, prompt)
                self.lengths[slot] = prompt.length
        except Exception:
            self._free(taken)
            raise
        return SlotStep(taken, np.stack([p.logits for p in prompts]))

    def _write_prompt(self, slot: int, prompt: CachedPrompt) -> None:
        """A cached prompt's keys and values into positions 0 .. length-1 of a slot, in every layer. Per head those
        positions are one run of memory, so each cache tensor is one strided copy: heads rows of length x head_dim
        values, the slot's rows capacity x head_dim apart (numpy on the CPU, cudaMemcpy2D on CUDA). The positions
        after the prompt keep what they held, as after a prefill: each is written before it is read."""
        if not self.on_cuda:
            for name, kv in zip(self.cache_names, prompt.kv):
                self.buffers[name][slot, :, :prompt.length] = kv.numpy()[0]
            return
        cudart = _cudart()
        width = prompt.length * self.derived.head_dim * np.dtype(self.cache_dtype).itemsize
        pitch = self.capacity * self.derived.head_dim * np.dtype(self.cache_dtype).itemsize
        for name, kv in zip(self.cache_names, prompt.kv):
            _cuda_check(cudart.cudaMemcpy2DAsync(self._slot_pointer(name, slot), pitch, kv.data_ptr(), width, width,
                                                 self.derived.heads, CUDA_MEMCPY_DEVICE_TO_DEVICE, None))
        # On the legacy default stream, which onnxruntime's own stream does not wait for: done before the next run.
        _cuda_check(cudart.cudaStreamSynchronize(None))

    def _slot_pointer(self, name: str, slot: int) -> int:
        return self.pointers[name] + slot * self.slot_bytes

    def _keep_binding(self):
        """An I/O binding of the graph that cuts each cache tensor's slot [1, heads, capacity, head_dim] to a prompt's
        length (made once, on the decoder's provider; its outputs are new device tensors, the cache entry)."""
        if self._keep_session is None:
            import onnxruntime as ort

            self._keep_session = ort.InferenceSession(_keep_graph(len(self.cache_names), self.cache_dtype).SerializeToString(),
                                                      providers=self.sessions["decoder_model_merged"].get_providers())
        return self._keep_session.io_binding()

    def _take(self, rows: int) -> list[int]:
        """Free slots for `rows` newcomers: the lowest ones, unless they are not consecutive and the lowest run of
        consecutive free slots that holds them all widens no decode step (the same CUDA-graph bucket; without a graph,
        no higher slot), so that they prefill in one call."""
        free = sorted(self.free)
        lowest = free[:rows]
        if len(_runs(lowest)) == 1:
            return lowest
        width = (lambda slot: self.bucket(slot + 1)) if self.cuda_graph else (lambda slot: slot + 1)
        for start in free:
            if all(s in self.free for s in range(start, start + rows)):
                return list(range(start, start + rows)) if width(start + rows - 1) <= width(lowest[-1]) else lowest
        return lowest

    def _prefill_calls(self, taken: list[int], lengths: np.ndarray) -> list[tuple[int, int]]:
        """(start, stop) row ranges, one decoder call each: runs of consecutive slots (one row each without
        batch_prefill). On the CPU, GroupQueryAttention holds rows x heads x padded length x slot capacity float32
        scores at once, so a run is cut where that would pass PREFILL_SCRATCH_BYTES (a row always goes)."""
        if not self.batch_prefill:
            return [(i, i + 1) for i in range(len(taken))]

        def fits(start: int, stop: int) -> bool:
            scores = (stop - start) * self.derived.heads * int(lengths[start:stop].max()) * self.capacity * 4
            return self.on_cuda or scores <= PREFILL_SCRATCH_BYTES

        calls = []
        for start, stop in _runs(taken):
            while start < stop:
                end = start + 1
                while end < stop and fits(start, end + 1):
                    end += 1
                calls.append((start, end))
                start = end
        return calls

    def decode(self, step: SlotStep, tokens: np.ndarray) -> SlotStep:
        """One token for every row of `step`: one decoder call over the slots 0 .. highest row's (with a CUDA graph,
        0 .. the smallest bucket that holds them: `bucket`); slots of no row get a pad token, their output is ignored."""
        if any(self.lengths[s] >= self.capacity for s in step.slots):
            raise RuntimeError(f"a KV slot is full ({self.capacity} tokens)")
        count = max(step.slots) + 1
        if self.cuda_graph:
            count = self.bucket(count)
        ids = np.full(count, self.pad_token_id, np.int64)
        ids[step.slots] = tokens
        seqlens = self._step_seqlens(count)
        slots = list(step.slots)
        if self.cuda_graph:
            greedy, fetch = self._graph_step(count, ids, seqlens)
            out = SlotStep(slots, greedy=greedy[slots], fetch=lambda: fetch()[slots])
        else:
            embeds = self._embed_on_device(ids[:, None]) if self.bind_io else self.embed(ids[:, None])
            out = SlotStep(slots, self._run_decoder(embeds, seqlens, 0)[slots])
        self.lengths[slots] += 1
        return out

    def _step_seqlens(self, count: int) -> np.ndarray:
        """`seqlens_k` of a decode step over slots 0 .. count-1: tokens so far per slot (the new one appends there); a
        slot of no row is written at 0 if free (_free resets its length), at its next position otherwise (which its own
        next step overwrites before reading), and at 0 if full."""
        return np.where(self.lengths[:count] < self.capacity, self.lengths[:count], 0).astype(np.int32)

    def select(self, step: SlotStep, rows: list[int]) -> SlotStep:
        """Rows not in `rows` leave: their slots are free again."""
        kept = set(rows)
        self._free([s for i, s in enumerate(step.slots) if i not in kept])
        return step.take(rows)

    def merge(self, a: SlotStep, b: SlotStep) -> SlotStep:
        return SlotStep.join(a, b)

    def release(self, step: SlotStep) -> None:
        """Every row of `step` leaves (finished, or its batch failed)."""
        self._free(step.slots)

    def release_all(self) -> None:
        self._free(range(len(self.lengths)))

    def _free(self, slots) -> None:
        for slot in slots:
            self.lengths[slot] = 0
            self.free.add(slot)

    # ---- CUDA graph ----

    def bucket(self, count: int) -> int:
        """The smallest CUDA-graph batch bucket of at least `count` slots."""
        return next(b for b in self.buckets if b >= count)

    def capture_graphs(self, runs: int = GRAPH_CAPTURE_RUNS) -> float:
        """Every bucket's decode step, `runs` times each, so that onnxruntime captures each bucket's graph now (at
        load) rather than on the first step that needs it, inside a request's time. The steps decode a pad token in
        every slot of the bucket at the slot's current length; lengths and free slots are left as they were (a slot's
        next position is written by its own next step before it is read, and a prefill writes a slot from position 0).
        Run it on the thread that decodes: onnxruntime's CUDA provider has kept captured graphs per thread. Returns
        the seconds it took (also logged); on the CPU (no graph) it does nothing."""
        if not self.cuda_graph:
            return 0.0
        import time

        started = time.perf_counter()
        for bucket in self.buckets:
            ids = np.full(bucket, self.pad_token_id, np.int64)
            seqlens = self._step_seqlens(bucket)
            for _ in range(runs):
                self._graph_step(bucket, ids, seqlens)
        took = time.perf_counter() - started
        log.info("serve: CUDA graphs of the decode step captured for batch buckets %s in %.2f s", self.buckets, took)
        return took

    def _graph_step(self, bucket: int, ids: np.ndarray, seqlens: np.ndarray):
        """The decode step over slots 0 .. bucket-1 as the bucket's CUDA graph: token ids and lengths are copied into
        the bucket's fixed device buffers, the embeddings are written into its fixed decoder input buffer, and its
        graph replays (onnxruntime captures graph id `bucket` after that id's warm-up runs, each id on its own;
        prefill runs with id -1, never captured). Returns each slot's greedy token [bucket] and a function that copies
        the slots' logits [bucket, V] to the host, valid until this bucket's next step."""
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = self._make_graph_binding(bucket)
        g["ids"].update_inplace(ids[:, None])
        g["seqlens"].update_inplace(seqlens)
        self.sessions["embed_tokens"].run_with_iobinding(g["embed_binding"])
        self.sessions["decoder_model_merged"].run_with_iobinding(g["binding"], g["options"])
        g["replays"] += 1
        replay = g["replays"]

        def fetch() -> np.ndarray:
            if g["replays"] != replay:
                raise RuntimeError("these logits were overwritten by a later decode step of the same batch bucket")
            return g["logits"].numpy()[:, -1]

        return g["next"].numpy()[:, 0], fetch

    def _make_graph_binding(self, n: int) -> dict:
        """Fixed buffers and bindings for a decode step over slots 0 .. n-1 (the first n slots of every layer's buffer,
        bound in place with shape [n, ...]), run as gpu_graph_id n (0 is onnxruntime's default id, -1 no graph)."""
        import onnxruntime as ort

        # self.device: "cuda"; "cpu" when a test runs this path on the CPU provider (fixed buffers, no graph)
        device, decoder, embed = self.device, self.sessions["decoder_model_merged"], self.sessions["embed_tokens"]
        embeds_dtype = self.input_types["decoder_model_merged"]["inputs_embeds"]
        hidden = next(i for i in decoder.get_inputs() if i.name == "inputs_embeds").shape[-1]
        embed_out = embed.get_outputs()[0]
        if ORT_TO_NUMPY[embed_out.type] != embeds_dtype:
            raise RuntimeError(f"embed_tokens returns {embed_out.type}, the decoder takes {embeds_dtype}")
        g = {"ids": ort.OrtValue.ortvalue_from_shape_and_type((n, 1), np.int64, device, 0),
             "embeds": ort.OrtValue.ortvalue_from_shape_and_type((n, 1, hidden), embeds_dtype, device, 0),
             "seqlens": ort.OrtValue.ortvalue_from_shape_and_type((n,), np.int32, device, 0),
             # GroupQueryAttention reads total_sequence_length on the host, so a replay keeps the captured value: the
             # capacity, which is right for every step (the rows' lengths come from seqlens_k; docs/notes.md).
             "total": ort.OrtValue.ortvalue_from_numpy(np.array(self.capacity, np.int32)),
             "last": ort.OrtValue.ortvalue_from_numpy(np.zeros(n, np.int64), device, 0),  # one position: index 0
             "logits": ort.OrtValue.ortvalue_from_shape_and_type((n, 1, self.vocab_size), np.float32, device, 0),
             "next": ort.OrtValue.ortvalue_from_shape_and_type((n, 1), np.int64, device, 0), "replays": 0}
        g["embed_binding"] = embed.io_binding()
        g["embed_binding"].bind_ortvalue_input("input_ids", g["ids"])
        g["embed_binding"].bind_ortvalue_output(embed_out.name, g["embeds"])
        binding = g["binding"] = decoder.io_binding()
        binding.bind_ortvalue_input("inputs_embeds", g["embeds"])
        binding.bind_ortvalue_input("seqlens_k", g["seqlens"])
        binding.bind_ortvalue_input("total_sequence_length", g["total"])
        binding.bind_ortvalue_input(LAST_INDEX, g["last"])
        self._bind_slots(binding, 0, n)
        binding.bind_ortvalue_output("logits", g["logits"])
        binding.bind_ortvalue_output(NEXT_TOKEN, g["next"])
        g["options"] = ort.RunOptions()
        g["options"].add_run_config_entry("gpu_graph_id", str(n))
        return g


def _keep_graph(count: int, dtype) -> onnx.ModelProto:
    """prompt{i} = slot{i}[:, :, :length] for each of `count` cache tensors."""
    cache = lambda name, length: helper.make_tensor_value_info(name, ONNX_FLOAT[dtype], [1, "heads", length, "head_dim"])  # noqa: E731
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([2], np.int64), "axis")]
    nodes = [helper.make_node("Slice", [f"slot{i}", "zero", "length", "axis"], [f"prompt{i}"]) for i in range(count)]
    inputs = [cache(f"slot{i}", "capacity") for i in range(count)]
    inputs.append(helper.make_tensor_value_info("length", TensorProto.INT64, [1]))
    graph = helper.make_graph(nodes, "smolbox_prompt_keep", inputs, [cache(f"prompt{i}", "length") for i in range(count)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="smolbox.serve")
    model.ir_version = IR_VERSION
    return model


CUDA_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyKind


@functools.cache
def _cudart():
    """The CUDA runtime library onnxruntime's CUDA provider runs on (loaded by then: engine.preload_cuda_libraries,
    or the system's), for the strided copies of the prompt cache, which onnxruntime has no call for. Loaded as a
    PyDLL, whose calls keep the GIL: these calls are short, and a CDLL's release and retake of the GIL around each
    of them waited for the event loop and request threads under load, which made a reuse in the loaded server many
    times slower than alone (docs/benchmarks.md, 2026-12-01 leases 7 and 8, "ctypes and the GIL")."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.PyDLL(name)
        except OSError:
            continue
        lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        return lib
    raise RuntimeError("no CUDA runtime library (libcudart) found for the prompt cache; set serve.prompt_cache_mb=0")


def _cuda_check(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"CUDA error {code}: {_cudart().cudaGetErrorString(code).decode()}")


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """(start, stop) index ranges of `slots` (ascending) whose slots are consecutive: each binds as one [k, ...] view."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def load_runtime(folder: Path, variant: str, serve, providers=None) -> OnnxVLM:
    """SlotVLM when serve.kv_slots is on and the variant's decoder derives, else OnnxVLM (with one log line why).
    `serve` is the serve config section."""
    if serve.kv_slots:
        path = graph_path(folder, "decoder_model_merged", variant)
        try:
            derived = derive(onnx.load(str(path), load_external_data=False))
            if "CUDAExecutionProvider" in (providers or default_providers()) and not derived.half:
                # onnxruntime's CUDA GroupQueryAttention is fp16/bf16 only (docs/notes.md): an fp32 one would run on
                # the CPU, the whole cache copied there and back every step.
                raise NotDerivable("fp32 caches on CUDA")
        except NotDerivable as exc:
            log.info("serve: %s keeps the published decoder (no KV slots): %s", path.name, exc)
        else:
            capacity = serve.kv_capacity_tokens or serve.max_prompt_tokens + serve.max_tokens_limit
            model = SlotVLM(folder, variant, derived, serve.max_batch_size, capacity, providers,
                            serve.ort_session_config, cuda_graph=serve.cuda_graph, batch_prefill=serve.batch_prefill,
                            prompt_cache_bytes=int(serve.prompt_cache_mb * 2**20), prefill_dequantized=serve.prefill_dequantized,
                            attention_kernel=serve.attention_kernel)
            log.info("serve: decoder with %d KV slots of %d tokens (GroupQueryAttention, %.2f GiB of cache)%s", model.slots,
                     model.capacity, model.slot_bytes * model.slots * len(model.cache_names) / 2**30,
                     ", decode step as a CUDA graph" if model.cuda_graph else "")
            return model
    return OnnxVLM(folder, variant, providers=providers, session_config=serve.ort_session_config)
