"""ONNX Runtime inference over an export folder: vision encoder + token embeddings + decoder with KV cache.

No torch here: the serving image runs this module. Inputs are what the exported processor returns
(input_ids, attention_mask, pixel_values, pixel_attention_mask) as numpy arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Published SmolVLM ONNX suffixes, and what smolbox builds under each name.
VARIANT_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def graph_path(folder: Path, graph: str, variant: str) -> Path:
    return Path(folder) / "onnx" / f"{graph}{VARIANT_SUFFIX[variant]}.onnx"


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


# onnxruntime's CUDA MultiHeadAttention picks cuDNN's flash attention for fp16, and cuDNN builds a new plan for
# every new sequence length: each decode step, in every layer (20 tok/s instead of 256 for q4f16 on an H100).
# The decoder gets sdpa_kernel=2 (memory-efficient attention); the vision encoder, whose shapes repeat, keeps
# cuDNN (49 ms against 94 ms for 13 tiles).
CUDA_OPTIONS = {"sdpa_kernel": "2"}


def _with_cuda_options(provider):
    if provider == "CUDAExecutionProvider":
        return (provider, dict(CUDA_OPTIONS))
    if isinstance(provider, tuple) and provider[0] == "CUDAExecutionProvider":
        return (provider[0], {**CUDA_OPTIONS, **provider[1]})
    return provider


@dataclass
class Step:
    """Logits of the last position of each row, and the cache to continue from (device-resident on CUDA)."""

    logits: np.ndarray  # [B, V] float32
    past: dict  # name -> np.ndarray, or onnxruntime.OrtValue on the GPU
    attention_mask: np.ndarray  # [B, total]


class OnnxVLM:
    def __init__(self, folder: str | Path, variant: str = "fp32", providers: list[str] | None = None,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.variant = variant
        config = json.loads((self.folder / "config.json").read_text())
        text = config["text_config"]
        self.image_token_id = config["image_token_id"]
        self.num_layers = text["num_hidden_layers"]
        self.vocab_size = text["vocab_size"]
        generation = self._read_json("generation_config.json")
        eos = generation.get("eos_token_id", text.get("eos_token_id"))
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = generation.get("pad_token_id", text.get("pad_token_id")) or 0

        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in (session_config or {}).items():  # onnxruntime session config entries, e.g. ep.cuda.*
            options.add_session_config_entry(key, str(value))
        self.providers = providers or default_providers()
        self.sessions = {
            g: ort.InferenceSession(str(graph_path(self.folder, g, variant)), options,
                                    providers=[_with_cuda_options(p) for p in self.providers] if g == "decoder_model_merged" else self.providers)
            for g in GRAPHS
        }
        decoder = self.sessions["decoder_model_merged"]
        self.past_inputs = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in decoder.get_outputs()]
        # A traced decoder returns logits for every position, the fused one (smolbox.onnx_decoder) the last only.
        self.logits_all_positions = decoder.get_outputs()[0].shape[1] != 1
        self.input_types = {g: {i.name: _ORT_TO_NUMPY[i.type] for i in s.get_inputs()} for g, s in self.sessions.items()}
        self._cache_sessions: dict = {}
        self.pixel_dtype = self.input_types["vision_encoder"]["pixel_values"]  # float16 for fp16 graphs
        # Which provider the decoder really got (onnxruntime falls back to CPU when CUDA cannot load).
        self.provider = decoder.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        # With I/O binding the KV cache and the decode-step embeddings stay in the session's device memory between
        # steps. Always on for CUDA; on the CPU it changes nothing but can be switched on to test that path.
        self.bind_io = self.on_cuda
        self.device = "cuda" if self.on_cuda else "cpu"

    def _read_json(self, name: str) -> dict:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        types = self.input_types[graph]
        return self.sessions[graph].run(None, {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in feeds.items()})

    def embed(self, input_ids: np.ndarray, pixel_values=None, pixel_attention_mask=None) -> np.ndarray:
        embeds = self._run("embed_tokens", {"input_ids": input_ids})[0]
        image_positions = input_ids == self.image_token_id
        if pixel_values is not None and image_positions.any():
            features = self._run("vision_encoder", {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask.astype(bool)})[0]
            features = features.reshape(-1, embeds.shape[-1])
            if features.shape[0] != int(image_positions.sum()):
                raise ValueError(f"{features.shape[0]} image features for {int(image_positions.sum())} <image> tokens")
            embeds[image_positions] = features.astype(embeds.dtype)
        return embeds

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        # KV-head and head-size dimensions are fixed numbers in the graph; the past length starts at zero.
        past = {}
        for inp in self.past_inputs:
            _, heads, _, head_dim = inp.shape
            past[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype=_ORT_TO_NUMPY[inp.type])
        return past

    def _embed_on_device(self, input_ids: np.ndarray):
        """Token embeddings left in device memory for the decoder to read (decode steps carry no image)."""
        binding = self.sessions["embed_tokens"].io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_output(self.sessions["embed_tokens"].get_outputs()[0].name, self.device)
        self.sessions["embed_tokens"].run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def forward(self, embeds, attention_mask: np.ndarray, past: dict[str, np.ndarray]) -> Step:
        """One decoder call over `embeds` (prefill or one new token per row; a host array, or an OrtValue already on
        the GPU) with the cache so far."""
        new = embeds.shape[1] if isinstance(embeds, np.ndarray) else embeds.shape()[1]
        # Same positions as transformers' generate: count real tokens, padding gets 0.
        positions = np.cumsum(attention_mask, axis=-1) - 1
        positions = np.where(attention_mask == 0, 0, positions)[:, -new:]
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions}
        if self.bind_io:
            return self._forward_on_device(feeds, past, attention_mask)
        outputs = self._run("decoder_model_merged", {**feeds, **past})
        next_past = {name.replace("present.", "past_key_values."): value for name, value in zip(self.output_names[1:], outputs[1:])}
        return Step(outputs[0][:, -1].astype(np.float32), next_past, attention_mask)

    def _forward_on_device(self, feeds: dict, past: dict, attention_mask: np.ndarray) -> Step:
        """The KV cache stays in device memory between steps (I/O binding); only the logits come back."""
        session = self.sessions["decoder_model_merged"]
        types = self.input_types["decoder_model_merged"]
        binding = session.io_binding()
        for name, value in feeds.items():
            _bind_input(binding, name, np.ascontiguousarray(value, dtype=types[name]) if isinstance(value, np.ndarray) else value)
        for name, value in past.items():  # host arrays only for the empty first-step cache
            _bind_input(binding, name, np.ascontiguousarray(value, dtype=types[name]) if isinstance(value, np.ndarray) else value)
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        next_past = {name.replace("present.", "past_key_values."): value for name, value in zip(self.output_names[1:], outputs[1:])}
        logits = outputs[0].numpy()
        return Step(logits[:, -1].astype(np.float32), next_past, attention_mask)

    # ---- batch surgery (continuous batching): rows leave a running batch, new rows join it -------------------

    def select(self, step: Step, rows: list[int]) -> Step:
        """Keep only `rows` of a batch (finished requests leave) and drop cache columns that are padding in every
        remaining row."""
        mask = step.attention_mask[rows]
        trim = int(np.argmax(mask.any(axis=0)))
        feeds = {"index": np.asarray(rows, np.int64), "trim": np.array([trim], np.int64)}
        past = self._cache_op("select", {name: {"x": value} for name, value in step.past.items()}, feeds)
        return Step(step.logits[rows], past, mask[:, trim:])

    def merge(self, a: Step, b: Step) -> Step:
        """One batch from two: the shorter cache is left-padded (its padding columns are masked out, positions come
        from the mask) and the rows are stacked."""
        total = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
        pad = {key: total - s.attention_mask.shape[1] for key, s in (("a", a), ("b", b))}
        feeds = {f"pads_{key}": np.array([0, 0, n, 0, 0, 0, 0, 0], np.int64) for key, n in pad.items()}
        past = self._cache_op("merge", {name: {"a": a.past[name], "b": b.past[name]} for name in a.past}, feeds)
        mask = np.concatenate([np.pad(a.attention_mask, ((0, 0), (pad["a"], 0))), np.pad(b.attention_mask, ((0, 0), (pad["b"], 0)))])
        return Step(np.concatenate([a.logits, b.logits]), past, mask)

    def _cache_op(self, op: str, tensors: dict[str, dict], feeds: dict[str, np.ndarray]) -> dict:
        """Run one small graph per cache tensor, on the decoder's device (the cache never leaves the GPU)."""
        session = self._cache_sessions.get(op)
        if session is None:
            import onnxruntime as ort

            dtype = self.input_types["decoder_model_merged"][self.past_inputs[0].name]
            session = self._cache_sessions[op] = ort.InferenceSession(
                _cache_graph(op, dtype).SerializeToString(), providers=self.sessions["decoder_model_merged"].get_providers())
        out = {}
        for name, inputs in tensors.items():
            if not self.bind_io:
                out[name] = session.run(None, {**inputs, **feeds})[0]
                continue
            binding = session.io_binding()
            for key, value in {**inputs, **feeds}.items():
                _bind_input(binding, key, value)
            binding.bind_output("y", self.device)
            session.run_with_iobinding(binding)
            out[name] = binding.get_outputs()[0]
        return out

    def prefill(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None) -> Step:
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask)
        return self.forward(embeds, attention_mask.astype(np.int64), self.empty_past(input_ids.shape[0]))

    def decode(self, step: Step, tokens: np.ndarray) -> Step:
        mask = np.concatenate([step.attention_mask, np.ones((tokens.shape[0], 1), np.int64)], axis=1)
        # On the GPU the embeddings go straight to the decoder: no round trip through host memory per step.
        embeds = self._embed_on_device(tokens[:, None]) if self.bind_io else self.embed(tokens[:, None])
        return self.forward(embeds, mask, step.past)

    def generate(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, max_new_tokens: int = 32) -> np.ndarray:
        """Greedy decoding; rows that reached end-of-utterance are padded, as transformers' generate does."""
        step = self.prefill(input_ids, attention_mask, pixel_values, pixel_attention_mask)
        batch = input_ids.shape[0]
        done = np.zeros(batch, dtype=bool)
        generated = []
        for i in range(max_new_tokens):
            tokens = np.where(done, self.pad_token_id, step.logits.argmax(-1)).astype(np.int64)
            generated.append(tokens)
            done |= np.isin(tokens, list(self.eos_token_ids))
            if done.all() or i == max_new_tokens - 1:
                break
            step = self.decode(step, tokens)
        return np.stack(generated, axis=1)


def _bind_input(binding, name: str, value) -> None:
    """A host array is copied to the device by onnxruntime; an OrtValue already there is used in place."""
    if isinstance(value, np.ndarray):
        binding.bind_cpu_input(name, value)
    else:
        binding.bind_ortvalue_input(name, value)


def _cache_graph(op: str, dtype):
    """select: y = x[index][:, :, trim:]   merge: y = concat(pad(a, pads_a), pad(b, pads_b)) along the batch.
    x, a, b are one cache tensor [batch, heads, length, head_dim]; pads are ONNX Pad's 8 numbers."""
    from onnx import TensorProto, helper

    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[dtype]
    cache = lambda name: helper.make_tensor_value_info(name, elem, ["b", "h", "t", "d"])  # noqa: E731
    ints = lambda name, n: helper.make_tensor_value_info(name, TensorProto.INT64, [n])  # noqa: E731
    big = helper.make_tensor("end", TensorProto.INT64, [1], [2**62])
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
    if op == "select":
        nodes = [helper.make_node("Gather", ["x", "index"], ["rows"], axis=0),
                 helper.make_node("Slice", ["rows", "trim", "end", "axis"], ["y"])]
        inputs, inits = [cache("x"), ints("index", "k"), ints("trim", 1)], [big, axis]
    else:
        nodes = [helper.make_node("Pad", ["a", "pads_a"], ["pa"]), helper.make_node("Pad", ["b", "pads_b"], ["pb"]),
                 helper.make_node("Concat", ["pa", "pb"], ["y"], axis=0)]
        inputs, inits = [cache("a"), cache("b"), ints("pads_a", 8), ints("pads_b", 8)], []
    graph = helper.make_graph(nodes, f"kv_{op}", inputs, [cache("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="smolbox.runtime")
    model.ir_version = 10
    return model
