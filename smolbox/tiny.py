"""The embedded tiny bundle: a SmolVLM-shaped model, its processor and an image preference set, built offline.

Everything is derived from fixed seeds, so two builds on any machine give the same files. The bundle is saved
with `save_pretrained` / parquet and loaded back through exactly the code path used for hub ids.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUNDLE_VERSION = "1"

# SmolVLM-Instruct's chat template, verbatim (tokenizer and processor carry the same one).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GRID = 4  # <row_i_col_j> tokens up to this many tiles per side
SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, GRID + 1) for j in range(1, GRID + 1)]
)

# bitsandbytes on CPU needs in_features >= its 64-wide block, so no Linear here is narrower than 64.
# Sizes: 32-px tiles of 8-px patches, pixel shuffle 2 -> 4 image tokens per tile; images up to 64 px -> 2x2 tiles + global.
TILE = 32
PATCH = 8
SCALE_FACTOR = 2
LONGEST_EDGE = 64

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40), "purple": (140, 50, 170)}
SHAPES = ["square", "circle", "triangle"]
N_TRAIN, N_TEST = 48, 8


def cache_root() -> Path:
    return Path(os.environ.get("SMOLBOX_CACHE", Path.home() / ".cache" / "smolbox"))


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def resolve(name: str, kind: str) -> str:
    """Map 'builtin:tiny' to the bundle's model or data folder (kind = 'model' | 'data'); other names pass through."""
    if not is_builtin(name):
        return name
    if name != f"{BUILTIN_PREFIX}tiny":
        raise ValueError(f"unknown builtin '{name}': the only builtin is '{BUILTIN_PREFIX}tiny'")
    return str(ensure_bundle() / kind)


def bundle_dir() -> Path:
    return cache_root() / f"tiny-v{BUNDLE_VERSION}"


def ensure_bundle(root: Path | None = None) -> Path:
    """Build the bundle once (atomically: temp folder + rename) and return its folder."""
    root = root or bundle_dir()
    if (root / "COMPLETE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root.parent))
    try:
        build_processor().save_pretrained(tmp / "model")
        build_model().save_pretrained(tmp / "model")
        write_preference_set(tmp / "data")
        (tmp / "COMPLETE").write_text(BUNDLE_VERSION + "\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; theirs is identical
            if not (root / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = (
        "the a an is are this that what which color shape image picture photo in on of and with shows there "
        "describe answer question small large bright dark left right center background square circle triangle "
        "red green blue yellow purple white black round corner edge one two three user assistant yes no it"
    ).split()
    lines = [f"The {s} is {c}." for s in SHAPES for c in COLORS] + [f"What color is the {s}?" for s in SHAPES]
    lines += ["User: Assistant: Describe the image.", "Answer with one sentence."]
    lines += [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(2000)]
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        # Without this, token_type_ids reach generate() and fail (docs/notes.md).
        model_input_names=["input_ids", "attention_mask"],
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "left"
    return fast


def build_processor():
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        do_pad=True,
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        image_seq_len=(TILE // PATCH) ** 2 // SCALE_FACTOR**2,
        chat_template=CHAT_TEMPLATE,
    )


def build_model():
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    config = Idefics3Config(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        vision_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": TILE, "patch_size": PATCH, "num_channels": 3,
        },
        text_config={
            "model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
            "max_position_embeddings": 2048, "rope_theta": 273768.0, "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _draw(shape: str, color: tuple[int, int, int], size: tuple[int, int], rng: random.Random):
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    w, h = size
    m = min(w, h)
    x0, y0 = rng.randint(0, w - m // 2), rng.randint(0, h - m // 2)
    box = [x0, y0, x0 + m // 2, y0 + m // 2]
    if shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "circle":
        d.ellipse(box, fill=color)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
    return img


def preference_rows(n: int, seed: int) -> list[dict]:
    """Rows in the HuggingFaceH4/rlaif-v_formatted schema: images, prompt, chosen, rejected."""
    rng = random.Random(seed)
    names = list(COLORS)
    rows = []
    for _ in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(names)
        wrong = rng.choice([c for c in names if c != color])
        size = rng.choice([(96, 72), (64, 64), (80, 120), (48, 48)])
        img = _draw(shape, COLORS[color], size, rng)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append(
            {
                "images": [{"bytes": buf.getvalue(), "path": None}],
                "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": f"What color is the {shape}?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"The {shape} is {color}."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"The {shape} is {wrong}."}]}],
            }
        )
    return rows


def write_preference_set(folder: Path) -> None:
    """Parquet files named like a hub data set (data/<split>-*.parquet), so load_dataset(folder) reads them."""
    from datasets import Dataset, Features, Image, List, Value

    message = {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
    features = Features(
        {"images": List(Image()), "prompt": List(message), "chosen": List(message), "rejected": List(message)}
    )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", N_TRAIN, 1), ("test", N_TEST, 2)):
        Dataset.from_list(preference_rows(n, seed), features=features).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
