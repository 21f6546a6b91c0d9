"""ONNX Runtime inference over an export folder: vision encoder + token embeddings + decoder with KV cache.

No torch here: the serving image runs this module. Inputs are what the exported processor returns
(input_ids, attention_mask, pixel_values, pixel_attention_mask) as numpy arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .onnx_layout import GRAPHS, IR_VERSION, ONNX_FLOAT, OPSET, ORT_TO_NUMPY, PAST, PRESENT, TO_THE_END, graph_path


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def variant_providers(variant: str, cuda_options: dict | None = None) -> list:
    """Providers for one variant: CUDA when onnxruntime can use it, except int8 (quantize_dynamic's MatMulInteger
    has no CUDA kernel), then the CPU."""
    if variant == "int8" or "CUDAExecutionProvider" not in default_providers():
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", dict(cuda_options or {})), "CPUExecutionProvider"]


# onnxruntime's CUDA MultiHeadAttention picks cuDNN's flash attention for fp16, and cuDNN builds a new plan for
# every new sequence length: each decode step, in every layer, which made decoding an order of magnitude slower.
# The decoder gets sdpa_kernel=2 (memory-efficient attention); the vision encoder, whose shapes repeat, keeps cuDNN,
# which is faster there (docs/benchmarks.md, H100 first pass, "cuDNN attention off for the decoder").
CUDA_OPTIONS = {"sdpa_kernel": "2"}


def with_cuda_options(provider, **overrides):
    """A CUDA provider with CUDA_OPTIONS under its own options, then `overrides` (a None drops that option); any
    other provider as it is."""
    name, options = provider if isinstance(provider, tuple) else (provider, {})
    if name != "CUDAExecutionProvider":
        return provider
    merged = {**CUDA_OPTIONS, **options, **overrides}
    return (name, {key: value for key, value in merged.items() if value is not None})


@dataclass
class Step:
    """Logits of the last position of each row, and the cache to continue from (device-resident on CUDA)."""

    logits: np.ndarray  # [B, V] float32
    past: dict  # name -> np.ndarray, or onnxruntime.OrtValue on the GPU
    attention_mask: np.ndarray  # [B, total]

    @property
    def greedy(self) -> np.ndarray:
        """[B] int64: each row's argmax."""
        return self.logits.argmax(-1).astype(np.int64)


class OnnxVLM:
    def __init__(self, folder: str | Path, variant: str = "fp32", providers: list[str] | None = None,
                 session_config: dict[str, str] | None = None):
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

        options = session_options(session_config)
        self.providers = providers or default_providers()
        self.sessions = {
            g: self._session(g, options, [with_cuda_options(p) for p in self.providers] if g == "decoder_model_merged" else self.providers)
            for g in GRAPHS
        }
        decoder = self.sessions["decoder_model_merged"]
        self.past_inputs = [i for i in decoder.get_inputs() if i.name.startswith(PAST)]
        self.output_names = [o.name for o in decoder.get_outputs()]
        self.past_names = [name.replace(PRESENT, PAST) for name in self.output_names if name.startswith(PRESENT)]
        # A traced decoder returns logits for every position, the fused one (smolbox.export.fused_decoder) the last only.
        self.logits_all_positions = decoder.get_outputs()[0].shape[1] != 1
        self.input_types = {g: {i.name: ORT_TO_NUMPY[i.type] for i in s.get_inputs()} for g, s in self.sessions.items()}
        self._helper_sessions: dict = {}
        self.pixel_dtype = self.input_types["vision_encoder"]["pixel_values"]  # float16 for fp16 graphs
        # Which provider the decoder really got (onnxruntime falls back to CPU when CUDA cannot load).
        self.provider = decoder.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        # With I/O binding the KV cache and the decode-step embeddings stay in the session's device memory between
        # steps. Always on for CUDA; on the CPU it changes nothing but can be switched on to test that path.
        self.bind_io = self.on_cuda
        self.device = "cuda" if self.on_cuda else "cpu"
        self.prefill_multiple = 16 if self.on_cuda else 1  # see prefill()

    def _session(self, graph: str, options, providers):
        """The session of one graph (smolbox.serve.kv_decoder derives its own decoder here)."""
        import onnxruntime as ort

        return ort.InferenceSession(str(graph_path(self.folder, graph, self.variant)), options, providers=providers)

    def _read_json(self, name: str) -> dict:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        types = self.input_types[graph]
        return self.sessions[graph].run(None, {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in feeds.items()})

    def vision_features(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """The vision encoder's features [tiles, tokens, hidden] (a host array) of pixel tiles [B, N, 3, H, W]; tiles
        that are all zeros (padding) are dropped, as in embed(). A serving engine encodes the tiles of several
        requests in one call and passes each prompt its own rows as `image_features`."""
        return self._run(self.vision_graph(pixel_attention_mask), {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask.astype(bool)})[0]

    def vision_graph(self, pixel_attention_mask: np.ndarray) -> str:
        """The session that encodes tiles with this pixel mask: the export's vision encoder (smolbox.serve's runtime
        keeps a faster one for tiles without padding)."""
        return "vision_encoder"

    def embed(self, input_ids: np.ndarray, pixel_values=None, pixel_attention_mask=None, image_features=None):
        """Token embeddings with the image features in place of the <image> tokens: a host array, or with bind_io
        an OrtValue in device memory (features and embeddings never leave the GPU). `image_features` [tiles, tokens,
        hidden] (from vision_features, in prompt order) stand for the pixels when given."""
        image_positions = input_ids == self.image_token_id
        has_image = (pixel_values is not None or image_features is not None) and bool(image_positions.any())
        if self.bind_io:
            embeds = self._embed_on_device(input_ids)
            if not has_image:
                return embeds
            if image_features is not None:
                features, shape = image_features, image_features.shape
            else:
                features = self._bound_run(self.vision_graph(pixel_attention_mask),
                                           {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask.astype(bool)})
                shape = features.shape()
            self._check_image_count(shape[0] * shape[1], image_positions)
            # Row of the flattened features each position takes (0 for text positions, which keep their embedding).
            rows = np.zeros(input_ids.shape, np.int64)
            rows[image_positions] = np.arange(int(image_positions.sum()))
            return self._helper_op("place", {"embeds": embeds, "features": features, "rows": rows, "is_image": image_positions})
        embeds = self._run("embed_tokens", {"input_ids": input_ids})[0]
        if has_image:
            if image_features is None:
                image_features = self.vision_features(pixel_values, pixel_attention_mask)
            features = image_features.reshape(-1, embeds.shape[-1])
            self._check_image_count(features.shape[0], image_positions)
            embeds[image_positions] = features.astype(embeds.dtype)
        return embeds

    @staticmethod
    def _check_image_count(features: int, image_positions: np.ndarray) -> None:
        if features != int(image_positions.sum()):
            raise ValueError(f"{features} image features for {int(image_positions.sum())} <image> tokens")

    def _bound_run(self, graph: str, feeds: dict[str, np.ndarray]):
        """One session run with host inputs and its first output left in device memory (an OrtValue)."""
        session, types = self.sessions[graph], self.input_types[graph]
        binding = session.io_binding()
        for name, value in feeds.items():
            bind_input(binding, name, value, types[name])
        binding.bind_output(session.get_outputs()[0].name, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        # KV-head and head-size dimensions are fixed numbers in the graph; the past length starts at zero.
        past = {}
        for inp in self.past_inputs:
            _, heads, _, head_dim = inp.shape
            past[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype=ORT_TO_NUMPY[inp.type])
        return past

    def _embed_on_device(self, input_ids: np.ndarray):
        """Token embeddings left in device memory for the decoder to read."""
        return self._bound_run("embed_tokens", {"input_ids": input_ids})

    def forward(self, embeds, attention_mask: np.ndarray, past: dict[str, np.ndarray]) -> Step:
        """One decoder call over `embeds` (prefill or one new token per row; a host array, or an OrtValue already on
        the GPU) with the cache so far."""
        new = dims(embeds)[1]
        # Same positions as transformers' generate: count real tokens, padding gets 0.
        positions = np.cumsum(attention_mask, axis=-1) - 1
        positions = np.where(attention_mask == 0, 0, positions)[:, -new:]
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions}
        if self.bind_io:
            return self._forward_on_device(feeds, past, attention_mask)
        outputs = self._run("decoder_model_merged", {**feeds, **past})
        return Step(outputs[0][:, -1].astype(np.float32), dict(zip(self.past_names, outputs[1:])), attention_mask)

    def _forward_on_device(self, feeds: dict, past: dict, attention_mask: np.ndarray) -> Step:
        """The KV cache stays in device memory between steps (I/O binding); only the logits come back."""
        session = self.sessions["decoder_model_merged"]
        types = self.input_types["decoder_model_merged"]
        binding = session.io_binding()
        # A decode step is launch-bound on the GPU (docs/notes.md): keep the Python around it lean.
        for name, value in (*feeds.items(), *past.items()):  # host arrays: the step's feeds, the empty first cache
            bind_input(binding, name, value, types[name])
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        return Step(logits[:, -1].astype(np.float32), dict(zip(self.past_names, outputs[1:])), attention_mask)

    # ---- batch surgery (continuous batching): rows leave a running batch, new rows join it -------------------

    def select(self, step: Step, rows: list[int]) -> Step:
        """Keep only `rows` of a batch (finished requests leave) and drop cache columns that are padding in every
        remaining row."""
        mask = step.attention_mask[rows]
        trim = int(np.argmax(mask.any(axis=0)))
        feeds = {"index": np.asarray(rows, np.int64), "trim": np.array([trim], np.int64)}
        past = {name: self._helper_op("select", {"x": value, **feeds}) for name, value in step.past.items()}
        return Step(step.logits[rows], past, mask[:, trim:])

    def release(self, step: Step) -> None:
        """The rows of `step` are done (finished, or their batch failed). Nothing to free here: the cache lives in the
        step; the slot runtime (smolbox.serve.kv_decoder) frees their slots."""

    def release_all(self) -> None:
        """No row runs any more (after a failed step): everything held for rows is free again."""

    def merge(self, a: Step, b: Step) -> Step:
        """One batch from two: the shorter cache is left-padded (its padding columns are masked out, positions come
        from the mask) and the rows are stacked."""
        total = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
        pad = {key: total - s.attention_mask.shape[1] for key, s in (("a", a), ("b", b))}
        feeds = {f"pads_{key}": np.array([0, 0, n, 0, 0, 0, 0, 0], np.int64) for key, n in pad.items()}
        past = {name: self._helper_op("merge", {"a": a.past[name], "b": b.past[name], **feeds}) for name in a.past}
        mask = np.concatenate([np.pad(a.attention_mask, ((0, 0), (pad["a"], 0))), np.pad(b.attention_mask, ((0, 0), (pad["b"], 0)))])
        return Step(np.concatenate([a.logits, b.logits]), past, mask)

    def _helper_op(self, op: str, feeds: dict):
        """One of the small graphs of _helper_graph, on the decoder's device: KV-cache surgery for continuous
        batching, image features into the embeddings. With bind_io its inputs and output stay in device memory."""
        session = self._helper_sessions.get(op)
        if session is None:
            import onnxruntime as ort

            cache = self.input_types["decoder_model_merged"][self.past_inputs[0].name]
            embeds = self.input_types["decoder_model_merged"]["inputs_embeds"]
            features = ORT_TO_NUMPY[self.sessions["vision_encoder"].get_outputs()[0].type]
            session = self._helper_sessions[op] = ort.InferenceSession(
                _helper_graph(op, cache, embeds, features).SerializeToString(),
                providers=self.sessions["decoder_model_merged"].get_providers())
        if not self.bind_io:
            return session.run(None, feeds)[0]
        binding = session.io_binding()
        for key, value in feeds.items():
            bind_input(binding, key, value)
        binding.bind_output("y", self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def pad_prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """onnxruntime's CUDA MultiHeadAttention takes its memory-efficient kernel with an attention mask only when
        the query length is a multiple of 8 (fp16) or 16 (fp32); otherwise an unfused one, which took a large share
        of a full-size prefill (docs/notes.md, "Learned building smolbox"). Left padding to a multiple of
        prefill_multiple changes no result."""
        attention_mask = attention_mask.astype(np.int64)
        extra = -input_ids.shape[1] % self.prefill_multiple
        if extra:
            input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=self.pad_token_id)
            attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
        return input_ids, attention_mask

    def prefill(self, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, image_features=None) -> Step:
        input_ids, attention_mask = self.pad_prompt(input_ids, attention_mask)
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask, image_features)
        return self.forward(embeds, attention_mask, self.empty_past(input_ids.shape[0]))

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
        try:
            for i in range(max_new_tokens):
                tokens = np.where(done, self.pad_token_id, step.greedy)
                generated.append(tokens)
                done |= np.isin(tokens, list(self.eos_token_ids))
                if done.all() or i == max_new_tokens - 1:
                    break
                step = self.decode(step, tokens)
        finally:
            self.release(step)
        return np.stack(generated, axis=1)


def session_options(session_config: dict[str, str] | None = None):
    """onnxruntime SessionOptions, quiet, with these session config entries (e.g. ep.cuda.*)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, str(value))
    return options


def dims(value) -> tuple:
    """The shape of a host array or of an OrtValue (whose shape is a method)."""
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


def bind_input(binding, name: str, value, dtype=None) -> None:
    """A host array (in `dtype`, the graph's, when given) is copied to the device by onnxruntime; an OrtValue
    already there is used in place."""
    if isinstance(value, np.ndarray):
        binding.bind_cpu_input(name, value if dtype is None else np.ascontiguousarray(value, dtype=dtype))
    else:
        binding.bind_ortvalue_input(name, value)


def _helper_graph(op: str, cache_dtype, embeds_dtype, features_dtype):
    """select: y = x[index][:, :, trim:]   merge: y = concat(pad(a, pads_a), pad(b, pads_b)) along the batch.
    x, a, b are one cache tensor [batch, heads, length, head_dim]; pads are ONNX Pad's 8 numbers.
    place: y = where(is_image, features.flatten(0, 1)[rows], embeds), the image features in place of the <image>
    tokens' embeddings [batch, length, hidden]."""
    from onnx import TensorProto, helper

    cache = lambda name: helper.make_tensor_value_info(name, ONNX_FLOAT[cache_dtype], ["b", "h", "t", "d"])  # noqa: E731
    ints = lambda name, n: helper.make_tensor_value_info(name, TensorProto.INT64, [n])  # noqa: E731
    if op == "select":
        big = helper.make_tensor("end", TensorProto.INT64, [1], [TO_THE_END])
        axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
        nodes = [helper.make_node("Gather", ["x", "index"], ["rows"], axis=0),
                 helper.make_node("Slice", ["rows", "trim", "end", "axis"], ["y"])]
        inputs, inits, output = [cache("x"), ints("index", "k"), ints("trim", 1)], [big, axis], cache("y")
    elif op == "merge":
        nodes = [helper.make_node("Pad", ["a", "pads_a"], ["pa"]), helper.make_node("Pad", ["b", "pads_b"], ["pb"]),
                 helper.make_node("Concat", ["pa", "pb"], ["y"], axis=0)]
        inputs, inits, output = [cache("a"), cache("b"), ints("pads_a", 8), ints("pads_b", 8)], [], cache("y")
    else:
        last = helper.make_tensor("last", TensorProto.INT64, [1], [-1])
        nodes = [helper.make_node("Flatten", ["features"], ["rows_hidden"], axis=2),  # [images * tokens, hidden]
                 helper.make_node("Cast", ["rows_hidden"], ["rows_cast"], to=ONNX_FLOAT[embeds_dtype]),
                 helper.make_node("Gather", ["rows_cast", "rows"], ["placed"], axis=0),
                 helper.make_node("Unsqueeze", ["is_image", "last"], ["where"]),
                 helper.make_node("Where", ["where", "placed", "embeds"], ["y"])]
        inputs = [helper.make_tensor_value_info("embeds", ONNX_FLOAT[embeds_dtype], ["b", "s", "h"]),
                  helper.make_tensor_value_info("features", ONNX_FLOAT[features_dtype], ["n", "t", "h"]),
                  helper.make_tensor_value_info("rows", TensorProto.INT64, ["b", "s"]),
                  helper.make_tensor_value_info("is_image", TensorProto.BOOL, ["b", "s"])]
        inits, output = [last], helper.make_tensor_value_info("y", ONNX_FLOAT[embeds_dtype], ["b", "s", "h"])
    graph = helper.make_graph(nodes, f"smolbox_{op}", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="smolbox.runtime")
    model.ir_version = IR_VERSION
    return model
