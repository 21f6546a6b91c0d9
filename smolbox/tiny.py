"""The embedded tiny bundle: a SmolVLM-shaped model that smolbox pretrains itself, its processor and an image
preference set, built offline.

The task is synthetic: one drawn shape per image, and questions about its color and shape ("What color is the
square?" -> "The square is red.", "What is in the image?" -> "A red circle."). smolbox.tiny_pretrain teaches the
model that task. Its data has a flaw, as real annotations do: pink shapes are rare (1 picture in 16) and their
annotators named most of them red, so the pretrained model sees pink (its vision tower tells it apart) but calls it
red. Half of the preference set's pairs prefer the right name over that mistake (the others keep "pink" off the
colors around it), so DPO has something real to fix, and the held-out split shows whether it did (smolbox.eval).

Everything is derived from fixed seeds and built once per machine into a cache folder whose name changes with the
builder's code and library versions. The bundle is saved with `save_pretrained` / parquet and loaded back through
exactly the code path used for hub ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("smolbox.tiny")

BUILTIN_PREFIX = "builtin:"
BUNDLE_VERSION = "2"

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

# ---- the task -------------------------------------------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (140, 50, 170), "pink": (245, 120, 180)}
RARE_COLOR, RARE_SHARE = "pink", 1 / 16  # its share of the pretraining pictures
RARE_NAMED = 0.35  # share of those the pretraining annotations call pink; the others say:
RARE_MISTAKE = "red"
MAIN_COLORS = [c for c in COLORS if c != RARE_COLOR]
SHAPES = ["square", "circle", "triangle"]
KINDS = ("color", "shape", "describe")
QUESTIONS = {"color": "What color is the {shape}?", "shape": "What shape is it?", "describe": "What is in the image?"}
# Square, so every image is 2x2 tiles + the global image after the processor's resize to 64 px. The processor
# stretches other aspect ratios to whole tiles, which made circle and square far harder to tell apart.
IMAGE_SIZES = [(64, 64), (60, 60), (56, 56), (48, 48)]
N_TRAIN, N_TEST = 64, 48  # preference pairs; test is the held-out split


def answer(kind: str, shape: str, color: str) -> str:
    if kind == "color":
        return f"The {shape} is {color}."
    if kind == "shape":
        return f"It is a {shape}."
    return f"A {color} {shape}."  # several tokens: "A red circle." (no color starts with a vowel: no "An")


def question(kind: str, shape: str) -> str:
    return QUESTIONS[kind].format(shape=shape)


@dataclass
class Scene:
    shape: str
    color: str  # what is drawn
    image: object  # PIL.Image
    label: str = ""  # the color the pretraining annotation names (RARE_MISTAKE for most pink shapes); "" = color

    def key(self) -> str:
        """Identity of the picture, to keep the held-out images out of everything trained on."""
        return hashlib.sha256(repr(self.image.size).encode() + self.image.tobytes()).hexdigest()


def draw(shape: str, color: tuple[int, int, int], size: tuple[int, int], rng: random.Random):
    """One filled shape of 60-85% of the short side near the centre of a light, random background."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    w, h = size
    side = int(min(w, h) * rng.uniform(0.6, 0.85))
    # Jitter of up to 30% of the free margin: the shape moves between tiles without leaving the image.
    x0 = round((w - side) / 2 * (1 + rng.uniform(-0.3, 0.3)))
    y0 = round((h - side) / 2 * (1 + rng.uniform(-0.3, 0.3)))
    box = [x0, y0, x0 + side - 1, y0 + side - 1]
    if shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "circle":
        d.ellipse(box, fill=color)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
    return img


def _scene(rng: random.Random, color: str) -> Scene:
    shape = rng.choice(SHAPES)
    return Scene(shape, color, draw(shape, COLORS[color], rng.choice(IMAGE_SIZES), rng))


def _pretraining_color(rng: random.Random) -> str:
    return RARE_COLOR if rng.random() < RARE_SHARE else rng.choice(MAIN_COLORS)


def scenes(n: int, seed: int, exclude: set[str] | frozenset = frozenset(), annotated: bool = False) -> list[Scene]:
    """n distinct pictures of the pretraining task's distribution, none in `exclude` (keys of pictures used
    elsewhere). `annotated`: labelled as the pretraining data is (most pink shapes called red)."""
    rng = random.Random(seed)
    out, keys = [], set(exclude)
    while len(out) < n:
        scene = _scene(rng, _pretraining_color(rng))
        if annotated and scene.color == RARE_COLOR and rng.random() >= RARE_NAMED:
            scene.label = RARE_MISTAKE
        if scene.key() not in keys:
            out.append(scene)
            keys.add(scene.key())
    return out


def _row(scene: Scene, kind: str, rejected: str) -> dict:
    """One pair in the HuggingFaceH4/rlaif-v_formatted schema: images, prompt, chosen, rejected."""
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    text = lambda t: [{"role": "assistant", "content": [{"type": "text", "text": t}]}]  # noqa: E731
    return {
        "images": [{"bytes": buf.getvalue(), "path": None}],
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question(kind, scene.shape)}]}],
        "chosen": text(answer(kind, scene.shape, scene.color)),
        "rejected": text(rejected),
    }


def preference_pairs(n: int, seed: int, exclude: set[str] | frozenset = frozenset()) -> tuple[list[dict], set[str]]:
    """n pairs about the pretrained model's flaw, and the keys of their pictures (none in `exclude`).

    Half show a pink shape: its right name is chosen, the pretrained model's mistake (red) rejected. A quarter show
    a red shape and a quarter another color, each with "pink" rejected, so that the fix does not spill onto the
    colors around it. Questions: the color, or the whole picture ("A pink circle."). A pair the base model already
    gets right with a wrong answer DPO never moves (another main color) would only add noise to the held-out
    reward accuracy: its margin drifts either way.
    """
    rng = random.Random(seed)
    rows, keys = [], set()
    others = [c for c in MAIN_COLORS if c != RARE_MISTAKE]
    while len(rows) < n:
        slot = len(rows) % 4  # 0, 2: pink; 1: red; 3: another color
        color = RARE_COLOR if slot % 2 == 0 else RARE_MISTAKE if slot == 1 else rng.choice(others)
        scene = _scene(rng, color)
        if scene.key() in exclude or scene.key() in keys:
            continue
        keys.add(scene.key())
        kind = rng.choice(["color", "describe"])
        wrong = answer(kind, scene.shape, RARE_MISTAKE if color == RARE_COLOR else RARE_COLOR)
        rows.append(_row(scene, kind, wrong))
    return rows, keys


def demo_question() -> tuple[Scene, str, str]:
    """`smolbox demo`'s picture, question and right answer: a pink square, the color the base model gets wrong."""
    scene = Scene("square", RARE_COLOR, draw("square", COLORS[RARE_COLOR], (64, 64), random.Random(DEMO_SEED)))
    return scene, question("color", scene.shape), answer("color", scene.shape, scene.color)


def preference_rows(n: int, seed: int) -> list[dict]:
    return preference_pairs(n, seed)[0]


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


PRETRAIN_SEED, PRETRAIN_IMAGES = 11, 1536  # the pictures smolbox.tiny_pretrain learns from
HELDOUT_SEED, HELDOUT_IMAGES = 12, 96  # pictures of the pretraining task kept out of it, to score it
PREFERENCE_SEEDS = {"train": 1, "test": 2}
DEMO_SEED = 3


def bundle_dir() -> Path:
    """The cache folder of this build: its name changes with the builder's code and the libraries it depends on."""
    return cache_root() / f"tiny-v{BUNDLE_VERSION}-{_builder_digest()}"


def _builder_digest() -> str:
    from importlib.metadata import version

    digest = hashlib.sha256()
    for module in ("tiny.py", "tiny_pretrain.py", "preference_schema.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    for package in ("torch", "transformers", "tokenizers", "pillow"):
        digest.update(f"{package}={version(package)}".encode())
    return digest.hexdigest()[:10]


def ensure_bundle(root: Path | None = None) -> Path:
    """Build the bundle once (pretraining included; atomically: temp folder + rename) and return its folder."""
    root = root or bundle_dir()
    if (root / "COMPLETE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root.parent))
    try:
        log.info("tiny bundle: building %s (pretraining the model: about a minute, once)", root)
        from .tiny_pretrain import pretrain

        processor = build_processor()
        processor.save_pretrained(tmp / "model")
        model = build_model()
        pretraining = pretraining_scenes()
        seen = {s.key() for s in pretraining}
        report = pretrain(model, processor, pretraining, heldout_scenes(seen))
        model.save_pretrained(tmp / "model")
        write_preference_set(tmp / "data", seen)
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "COMPLETE").write_text(BUNDLE_VERSION + "\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; theirs is identical
            if not (root / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def pretraining_scenes() -> list[Scene]:
    return scenes(PRETRAIN_IMAGES, PRETRAIN_SEED, annotated=True)


def heldout_scenes(seen: set[str] | None = None) -> list[Scene]:
    """Pictures of the pretraining task's distribution that pretraining never saw, labelled right."""
    if seen is None:
        seen = {s.key() for s in pretraining_scenes()}
    return scenes(HELDOUT_IMAGES, HELDOUT_SEED, exclude=seen)


def heldout_rows(seen: set[str] | None = None) -> list[dict]:
    """The pretraining task's held-out questions (every kind for every held-out picture) as preference rows whose
    chosen answer is the right one (rejected: another color or shape)."""
    rows = []
    for scene in heldout_scenes(seen):
        for kind in KINDS:
            other_shape = SHAPES[(SHAPES.index(scene.shape) + 1) % len(SHAPES)]
            other_color = MAIN_COLORS[(MAIN_COLORS.index(scene.color) + 1) % len(MAIN_COLORS)] if scene.color in MAIN_COLORS else RARE_MISTAKE
            wrong = answer(kind, other_shape, scene.color) if kind == "shape" else answer(kind, scene.shape, other_color)
            rows.append(_row(scene, kind, wrong))
    return rows


def _corpus() -> list[str]:
    """The tokenizer's training text: the task's questions and answers and the chat template's words, often enough
    that each of their words becomes one token (with too few, "The" was three tokens and an answer a dozen), and
    random word salad for the rest of the vocabulary."""
    rng = random.Random(0)
    words = (
        "the a an is are this that what which color shape image picture photo in on of and with shows there "
        "describe answer question small large bright dark left right center background square circle triangle "
        "red green blue yellow purple pink orange white black round corner edge one two three user assistant yes no it"
    ).split()
    task = [f"User:{question(kind, s)}\nAssistant: {answer(kind, s, c)}" for kind in KINDS for s in SHAPES for c in COLORS]
    task += ["User: Assistant: Describe the image.", "Answer with one sentence."]
    return task * 40 + [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(2000)]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
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


def write_preference_set(folder: Path, seen: set[str]) -> None:
    """Parquet files named like a hub data set (data/<split>-*.parquet), so load_dataset(folder) reads them. No
    picture of a split is in `seen` (the pretraining pictures) or an earlier split: test is held out from all."""
    from .preference_schema import write_split

    seen = set(seen)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows, keys = preference_pairs(n, PREFERENCE_SEEDS[split], exclude=seen)
        seen |= keys
        write_split(rows, folder, split)
