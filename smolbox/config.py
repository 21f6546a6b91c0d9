"""One typed config schema for every stage, loaded from YAML, `.env`/environment and CLI flags.

Precedence, lowest first: YAML file < `.env` file < process environment (`SMOLBOX_<SECTION>__<FIELD>`) <
CLI flags (`--<section>.<field> VALUE`). Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_PACKAGE = Path(__file__).resolve().parent
# The shipped configs: package data inside an installed wheel (pyproject.toml maps configs/ there), else the
# source checkout's configs/ (editable installs, the images).
CONFIG_DIR = next((d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if d.is_dir()), _PACKAGE / "configs")
ENV_PREFIX = "SMOLBOX_"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    id: str = Field("HuggingFaceTB/SmolVLM-Instruct", description="Hub id or local folder; 'builtin:tiny' is the embedded tiny model")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="auto = flash_attention_2 when installed on CUDA, else sdpa"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the non-quantized weights")


class QuantConfig(_Section):
    load_in_4bit: bool = Field(True, description="Load the base model in 4-bit with bitsandbytes")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bnb_4bit_quant_type)")
    double_quant: bool = Field(True, description="bnb_4bit_use_double_quant")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the 4-bit matmuls (bnb_4bit_compute_dtype)")


class AdapterConfig(_Section):
    r: int = Field(8, gt=0, description="LoRA/DoRA rank")
    alpha: int = Field(8, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Adapter dropout; 0 enables DoRA's fast path (TRL zeroes dropout anyway)")
    use_dora: bool = Field(True, description="DoRA (weight-decomposed LoRA) instead of plain LoRA")
    fused_dora: bool = Field(True, description="DoRA's forward as one GEMM epilogue and one scale (smolbox.train.dora; same function as peft's)")
    fused_dora_bias: bool = Field(False, description="The fused DoRA forward for layers with a bias too (SigLIP's q/k/v), which otherwise take peft's "
                                                     "(same function; smolbox.train.dora)")
    dora_norm_cache: bool = Field(False, description="Fused DoRA: compute the detached norm ||W + sBA|| once per optimizer step (when A or B "
                                                     "change) instead of in every forward and recompute (same values; smolbox.train.dora)")
    init_lora_weights: Literal["gaussian", "default"] = Field("gaussian", description="Initialisation of the A matrices")
    target_modules: list[str] = Field(
        default_factory=lambda: ["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
        description="Module names to adapt (these also match q/k/v in the vision tower)",
    )


class DataConfig(_Section):
    id: str = Field("HuggingFaceH4/rlaif-v_formatted", description="Hub id, local folder, save_to_disk folder, .parquet or .jsonl file; 'builtin:tiny' is the embedded set")
    revision: str | None = Field(None, description="Hub revision of the data set")
    train_split: str = Field("train[:6%]", description="Split spec with optional slice: train, train[:6%], train[10:500]")
    eval_split: str | None = Field("test[:1%]", description="null disables evaluation")
    image_max_size: int = Field(512, gt=0, description="Images are shrunk to fit this square, never enlarged")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Rows with a larger source image are bad rows")
    on_bad_row: Literal["skip", "fail"] = Field("skip", description="skip = drop and count the reason; fail = stop naming the row")
    num_proc: int = Field(0, ge=0, description="Processes for preprocessing; 0 = one per CPU core (at most 8)")


class TrainConfig(_Section):
    """DPO settings; names follow TRL's DPOConfig. Values left at None keep TRL's default."""

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate")
    beta: float = Field(0.1, gt=0, description="DPO beta: strength of the pull towards the reference model")
    global_batch_size: int = Field(
        32, gt=0, description="Pairs per optimizer step over all GPUs; accumulation is derived from it and the number "
                              "of processes, so 1 or 8 GPUs take the same steps on the same data")
    per_device_train_batch_size: int = Field(
        1, gt=0, description="Largest micro-batch per GPU (pairs); the largest divisor of global_batch_size / processes "
                             "up to this is used")
    per_device_eval_batch_size: int = Field(1, gt=0, description="Pairs per evaluation batch per GPU")
    num_train_epochs: float = Field(5.0, gt=0, description="Passes over the training split")
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name (linear, cosine, constant, ...)")
    warmup_steps: float = Field(0, ge=0, description="Linear warm-up: steps, or a fraction of all steps when < 1")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm")
    max_length: int | None = Field(None, description="None = no truncation (truncating into image tokens breaks VLMs)")
    bf16: bool = Field(True, description="bf16 autocast (mixed precision; needs a GPU with bf16). Weights already in bf16 (model.dtype) train in bf16 without it")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory")
    logging_steps: int = Field(10, gt=0, description="Optimizer steps between metric lines")
    eval_steps: int | None = Field(None, description="None = same as logging_steps")
    save_steps: int = Field(500, gt=0, description="Optimizer steps between checkpoints")
    save_total_limit: int | None = Field(3, description="Keep the last K checkpoints; None keeps all")
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = in the training process)")
    pack_pairs: bool = Field(True, description="Each pair as one packed row: the image encoded and the prompt computed once "
                                               "(same function as TRL's two rows per pair; sdpa/eager attention only)")
    compile: bool = Field(False, description="torch.compile each repeated block (SigLIP encoder and Llama decoder layers) in place: "
                                             "the same function, its elementwise ops fused (smolbox.train.compile)")
    compile_backend: str = Field("inductor", description="torch.compile backend for train.compile (aot_eager: capture without code generation)")
    compile_eager_rounding: bool = Field(True, description="train.compile rounds each fused intermediate to the model dtype where eager "
                                                            "would (inductor's emulate_precision_casts): compiled and eager losses then "
                                                            "differ by kernel noise, not by fp32-kept intermediates")
    cudnn_attention: Literal["off", "vision", "all"] = Field(
        "off", description="CUDA: PyTorch's cuDNN attention kernels first: in the vision tower's blocks (vision) or "
                           "everywhere (all); faster on Hopper, but each new shape builds a plan on the CPU (smolbox.train.attention)")
    precompute_ref_logps: bool = Field(False, description="Reference log-probs in one pass before training instead of in every step (the reference is fixed: same loss)")
    seed: int = Field(42, description="Seed for weights init, data order and sampling")
    ddp_timeout_s: int = Field(
        1800, gt=0, description="Several processes: how long a collective may wait before the job fails (a dead "
                                "process on another host ends the others after this); must exceed the first data preparation")
    report_to: list[str] = Field(default_factory=list, description="Trackers TRL/transformers log to (tensorboard, wandb, trackio, ...; each needs its package); [] = none")


class RunConfig(_Section):
    name: str = Field("smolvlm-dpo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run folder name (letters, digits, . _ -)")
    output_dir: str = Field("runs", description="Runs are written to <output_dir>/<name>/")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = CUDA when torch sees a GPU, else CPU")
    resume: str = Field("auto", description="auto = continue from the last complete checkpoint; never = refuse a non-empty run dir; or a checkpoint path")
    hf_cache: str | None = Field(None, description="HF cache folder (default: HF_HOME or ~/.cache/huggingface)")
    min_free_disk_gb: float = Field(10.0, ge=0.0, description="verify fails below this free space in output_dir")


ExportVariant = Literal["fp32", "fp16", "q8", "q4", "q4f16", "int8"]


class ExportConfig(_Section):
    source: str | None = Field(None, description="Training run folder, adapter folder, or 'base' (no adapter); null = <run.output_dir>/<run.name>")
    output_dir: str = Field("exports", description="Exports are written to <output_dir>/<name>/")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Export folder name; null = the run's name")
    merge_into: Literal["dequantized_nf4", "full_precision"] = Field(
        "dequantized_nf4", description="Base weights the adapters are merged into (docs/export.md has the measurement)"
    )
    variants: list[ExportVariant] = Field(
        default_factory=lambda: ["fp32", "fp16", "q8", "q4", "q4f16", "int8"],
        description="fp32 (always), fp16, q8/q4 (MatMulNBits weight-only, CUDA and CPU), q4f16 (q4 with fp16 activations, "
                    "for CUDA), int8 (dynamic, CPU only)",
    )
    decoder: Literal["auto", "fused", "traced"] = Field(
        "auto", description="fused = decoder written with onnxruntime's fused operators (Llama text models); traced = "
                            "torch.onnx trace; auto = fused where the model allows it",
    )
    vision: Literal["auto", "fused", "traced"] = Field(
        "auto", description="fused = vision encoder written with onnxruntime's fused operators (SigLIP gelu towers with "
                            "the pixel-shuffle connector); traced = torch.onnx trace; auto = fused where the model allows it",
    )
    block_size: int = Field(32, description="MatMulNBits quantization block size (16, 32, 64, 128, 256)")
    parity_prompts: int = Field(2, gt=0, description="Fixed image prompts used for parity")
    parity_new_tokens: int = Field(16, gt=0, description="Greedy tokens compared per parity prompt")
    fp32_max_logit_diff: float = Field(1e-3, gt=0, description="fp32 parity beyond this is a bug: the export fails")
    quantized_max_logit_diff: float = Field(2.0, gt=0, description="Quantized variants beyond this are flagged loudly")
    quantized_min_agreement: float = Field(0.5, ge=0, le=1, description="Quantized variants with less greedy agreement are flagged")
    overwrite: bool = Field(False, description="Replace an existing export folder of the same name")


class EvalConfig(_Section):
    run: str | None = Field(None, description="Run folder or adapter folder to score against its base, 'base' for the base model alone, 'none' to skip; null = <run.output_dir>/<run.name> when it exists")
    export: str | None = Field(None, description="Export folder whose ONNX variants to score, 'none' to skip; null = <export.output_dir>/<export.name or run.name> when it exists")
    split: str | None = Field(None, description="Held-out preference split; null = data.eval_split")
    max_samples: int | None = Field(100, gt=0, description="Score the first N pairs of the split; null = all")
    max_new_tokens: int = Field(64, gt=0, description="Greedy tokens generated per question")
    batch_size: int = Field(8, gt=0, description="Pairs (or questions) per forward / generate call")
    variants: list[ExportVariant] | None = Field(None, description="Export variants to score; null = every variant the export has")


class ServeConfig(_Section):
    model: str | None = Field(None, description="Export folder to serve; null = <export.output_dir>/<export.name or run.name>")
    variant: Literal["auto", "fp32", "fp16", "q8", "q4", "q4f16", "int8"] = Field(
        "auto", description="ONNX variant to load; auto = q4f16 on a GPU, q4 on the CPU (else what the export has)")
    model_name: str | None = Field(None, description="Model id in the API; null = the export folder's name")
    host: str = Field("127.0.0.1", description="Listen address (the serving image sets 0.0.0.0)")
    port: int = Field(8000, gt=0, lt=65536, description="Listen port (the serving image listens on 8000)")
    provider: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = CUDA execution provider when available, else CPU")
    api_key: str | None = Field(None, description="When set, requests need 'Authorization: Bearer <key>' (use SMOLBOX_SERVE__API_KEY)")
    max_batch_size: int = Field(8, gt=0, description="Requests generated together in one batch")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the batcher waits to fill a batch")
    continuous_batching: bool = Field(True, description="Waiting requests join the running batch after their prefill; false = a batch runs until its last row finishes")
    kv_slots: bool = Field(True, description="Decode with the server's derived GroupQueryAttention decoder: one fixed KV buffer per layer, a slot per row (max_batch_size slots), no cache copies when rows join or leave; false, or a decoder that cannot be derived (traced), = the published decoder as it is")
    kv_capacity_tokens: int | None = Field(None, gt=1, description="Tokens one KV slot holds (prompt + answer); null = max_prompt_tokens + max_tokens_limit. Memory: slots x capacity x layers x 2 x hidden x bytes per value")
    cuda_graph: bool = Field(True, description="With kv_slots on the CUDA provider, replay the decode step as a CUDA graph, one per batch bucket (powers of two up to the slot count; a step runs the smallest that holds its highest slot), all captured at load; ignored on the CPU")
    attention_kernel: int = Field(1, ge=0, description="With kv_slots on the CUDA provider, the attention kernels onnxruntime may use in the decoder's prefills (its sdpa_kernel bits: 1 flash, 2 memory-efficient, 8 cuDNN; 0 = onnxruntime's own choice, which plans cuDNN anew for every prompt length); decode steps use its decoding kernel whatever this says")
    overlap_rows: bool = Field(True, description="The running rows take each step's tokens (text, stop strings, events) on a thread of their own while the next decode step already runs for all of them; a row that finished leaves after that step, its extra token unused; false = the engine thread takes them between steps")
    batch_prefill: bool = Field(True, description="With kv_slots, newcomers whose KV slots are consecutive prefill in one decoder call, right-padded to the longest; false = one decoder call per newcomer")
    ort_session_config: dict[str, str] = Field(
        default_factory=dict, description="Extra onnxruntime session config entries for every graph (ep.cuda.* ones are ignored on the CPU)")

    @field_validator("ort_session_config", mode="before")
    @classmethod
    def _config_values_as_text(cls, value):
        # onnxruntime takes strings; YAML reads `1` as an int and `true` as a bool
        if isinstance(value, dict):
            return {k: ("1" if v is True else "0" if v is False else str(v)) for k, v in value.items()}
        return value
    max_queue: int = Field(64, gt=0, description="Waiting requests beyond this get 429")
    max_prefill_tokens_per_step: int = Field(
        2048, gt=0, description="Prompt tokens prefilled in one engine step beside the running rows' decode step, so "
                                "newcomers' prefills do not stall them; a longer prompt runs alone in its step "
                                "(continuous batching only)")
    max_kv_tokens: int = Field(
        65536, gt=0, description="KV cache capacity: prompt + max_tokens summed over the requests in flight; a request "
                                 "that would exceed it waits in the queue, one that exceeds it alone gets 400")
    image_cache_mb: float = Field(
        256.0, ge=0, description="Vision features of recent images (LRU, keyed by a hash of the decoded pixels) "
                                 "that a repeated image reuses instead of running the vision encoder; 0 = off")
    tile_cache_mb: float = Field(
        128.0, ge=0, description="Tiles of recent images (LRU, keyed by a hash of the decoded pixels), in each process "
                                 "that preprocesses requests: an image sent again (every later turn of a chat resends "
                                 "it) is not resized and tiled again; 0 = off")
    prefill_dequantized: bool = Field(
        False, description="With kv_slots and a 4-bit variant, prefills run through a second decoder whose 4-bit weights "
                           "are dequantized once at load (the same numbers; plain half-precision matrix products for "
                           "long prompts), decode steps through the 4-bit one; costs the text model's float weights in "
                           "device memory")
    prompt_cache_mb: float = Field(
        1024.0, ge=0, description="With kv_slots, the KV cache of recent prompts (LRU, keyed by a hash of the prompt's "
                                  "tokens and images) in the decoder's memory: a repeated prompt (a retry, the same "
                                  "question about the same image) is copied into its slot instead of prefilled; 0 = off")
    preprocess_workers: int = Field(
        0, ge=0, description="Processes that validate requests and decode, tile and tokenize their images (each with a "
                             "GIL of its own, which the engine thread never waits for); 0 = threads of the server process")
    max_body_bytes: int = Field(20_000_000, gt=0, description="Largest request body")
    max_image_pixels: int = Field(16_000_000, gt=0, description="Largest decoded image (width x height)")
    max_images: int = Field(4, ge=0, description="Images per request")
    max_prompt_tokens: int = Field(8192, gt=0, description="Prompt tokens after image expansion")
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request gives none")
    allow_remote_images: bool = Field(False, description="Fetch http(s) image URLs; off: the server makes no outbound requests")
    drain_timeout_s: float = Field(60.0, ge=0, description="On SIGTERM, how long in-flight requests may finish")
    log_format: Literal["text", "json"] = Field(
        "text", description="text = log lines for people; json = one JSON object per line, with one per request "
                            "(method, path, status, latency, tokens, request id; never the prompt or image)")

    @model_validator(mode="after")
    def _slots_hold_every_request(self):
        # A row's slot must hold its prompt and its answer: the API admits up to these two limits.
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < self.max_prompt_tokens + self.max_tokens_limit:
            raise ValueError(f"kv_capacity_tokens ({self.kv_capacity_tokens}) is below max_prompt_tokens + max_tokens_limit "
                             f"({self.max_prompt_tokens} + {self.max_tokens_limit}): lower those limits too, or leave it null")
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def export_dir(self) -> Path:
        """Where export writes and eval and serve read by default: <export.output_dir>/<export.name or run.name>."""
        return Path(self.export.output_dir) / (self.export.name or self.run.name)

    def fingerprint(self) -> str:
        """Hash of the settings that shape the trained weights (WEIGHT_KEYS); see weight_settings."""
        return hashlib.sha256(json.dumps(self.weight_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def weight_settings(self) -> dict[str, Any]:
        """{dotted key: value} for every key of WEIGHT_KEYS: what a resumed run must share with the run it resumes."""
        return {key: get_dotted(self.to_dict(), key) for key in WEIGHT_KEYS}


def get_dotted(tree: dict, dotted: str) -> Any:
    section, field = dotted.split(".")
    return tree.get(section, {}).get(field)


# What shapes the trained weights, and so the run fingerprint: a run folder is resumed only with these unchanged.
# Everything else may change between a crash and its resume: where files go and how often to log, evaluate and
# save; how the work is split (micro-batch, number of processes, loader workers); switches that compute the same
# function another way (attention kernel, fused DoRA, checkpointing, precomputed reference log-probs); where
# metrics also go (report_to); and export, eval and serve settings. The run's length (LENGTH_KEYS) is compared on
# its own: raising it continues a run.
# tests/test_config.py classifies every field, so a new field must be placed in one of these lists.
WEIGHT_KEYS = (
    "model.id", "model.revision", "model.dtype",
    "quant.load_in_4bit", "quant.quant_type", "quant.double_quant", "quant.compute_dtype",
    "adapter.r", "adapter.alpha", "adapter.dropout", "adapter.use_dora", "adapter.init_lora_weights",
    "adapter.target_modules",
    "data.id", "data.revision", "data.train_split", "data.image_max_size", "data.max_image_pixels", "data.on_bad_row",
    "train.learning_rate", "train.beta", "train.global_batch_size", "train.lr_scheduler_type", "train.warmup_steps",
    "train.weight_decay", "train.max_grad_norm", "train.max_length", "train.bf16", "train.seed",
)
LENGTH_KEYS = ("train.num_train_epochs", "train.max_steps")


SECTIONS: dict[str, type[_Section]] = {name: f.annotation for name, f in Config.model_fields.items()}


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """Accept a path, or the name of a shipped config ('seed', 'default', 'tiny')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {name_or_path} (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_dotenv(path: str | os.PathLike) -> dict[str, str]:
    """Minimal .env reader: KEY=VALUE lines, '#' comments, optional quotes, optional 'export '."""
    return {key: value for key, (value, _) in _dotenv_lines(path).items()}


def _dotenv_lines(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """{KEY: (value, line number)}; a missing file is an empty one."""
    values: dict[str, tuple[str, int]] = {}
    p = Path(path)
    if not p.is_file():
        return values
    try:
        text = p.read_text()
    except OSError as exc:  # e.g. a 600 .env of another uid, mounted into a container
        raise ConfigError(f"{p}: cannot be read ({exc.strerror}): make it readable, or pass --env-file '' to read none") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        if "=" not in line:
            raise ConfigError(f"{p}:{lineno}: expected KEY=VALUE, got {raw!r}")
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = (value, lineno)
    return values


def parse_scalar(text: str) -> Any:
    """Strings from env/CLI are read as YAML scalars, so '1e-5', 'true', 'null', '[a, b]' mean what they say."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _closest_first(name: str, known: list[str]) -> str:
    return ", ".join(difflib.get_close_matches(name, known, n=len(known), cutoff=0))


def check_key(dotted: str, origin: str) -> tuple[str, str]:
    """(section, field) of a dotted key, or a ConfigError naming the origin and the valid keys, closest first."""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"{origin}: unknown config key '{dotted}' (sections, closest first: {_closest_first(parts[0], list(SECTIONS))})")
    section, field = parts
    if field not in SECTIONS[section].model_fields:
        known = _closest_first(field, list(SECTIONS[section].model_fields))
        raise ConfigError(f"{origin}: unknown config key '{dotted}' (keys of '{section}', closest first: {known})")
    return section, field


def env_overrides(env: dict[str, str], origins: dict[str, str] | None = None) -> list[tuple[str, Any, str]]:
    """SMOLBOX_TRAIN__LEARNING_RATE=1e-5 -> ('train.learning_rate', 1e-5, origin). SMOLBOX_CONFIG is not a key.

    `origins` says where a variable came from (a .env line); the default is the process environment.
    """
    out = []
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
        out.append((dotted, parse_scalar(value), (origins or {}).get(key, f"environment variable {key}")))
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    dotenv: str | os.PathLike | None = ".env",
) -> Config:
    """Build the config: YAML, then .env, then environment, then explicit overrides (CLI).

    Every error names where the offending value came from: the YAML file, a line of the .env file, an environment
    variable or a CLI flag.
    """
    environ = dict(os.environ) if env is None else dict(env)
    dotenv_lines = _dotenv_lines(dotenv) if dotenv else {}
    merged_env = {**{k: v for k, (v, _) in dotenv_lines.items()}, **environ}
    origins = {k: f"line {n} of {dotenv} ({k})" for k, (_, n) in dotenv_lines.items() if k not in environ}
    if path is None:
        path = merged_env.get(f"{ENV_PREFIX}CONFIG", "default")
        try:
            cfg_path = resolve_config_path(path)
        except ConfigError as exc:
            key = f"{ENV_PREFIX}CONFIG"
            raise ConfigError(f"{origins.get(key, f'environment variable {key}')}: {exc}") from None
    else:
        cfg_path = resolve_config_path(path)
    try:
        tree = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{cfg_path}: top level must be a mapping of sections")
    for section, body in tree.items():
        if section not in SECTIONS:
            check_key(section, str(cfg_path))
        if not isinstance(body, dict):
            raise ConfigError(f"{cfg_path}: '{section}' must be a mapping")
        for field in body:
            check_key(f"{section}.{field}", str(cfg_path))
    layered = env_overrides(merged_env, origins) + [(d, v, f"--{d}") for d, v in (overrides or {}).items()]
    value_origins = {}
    for dotted, value, origin in layered:
        section, field = check_key(dotted, origin)
        tree.setdefault(section, {})[field] = value
        value_origins[dotted] = origin
    return validate(tree, source=str(cfg_path), origins=value_origins)


def validate(tree: dict, source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """The typed config; errors name each bad value's origin (`origins`: dotted key -> where it was set, else `source`)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            origin = (origins or {}).get(".".join(str(p) for p in err["loc"][:2]), source)
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r} from {origin})")
        raise ConfigError("invalid config\n" + "\n".join(lines)) from None


def cli_fields() -> list[tuple[str, Any]]:
    """(dotted key, pydantic FieldInfo) for every config field: the CLI mirrors the schema flag by flag."""
    return [(f"{s}.{name}", info) for s, cls in SECTIONS.items() for name, info in cls.model_fields.items()]
