"""Torch-free preprocessing for the serving image: what the exported Idefics3 processor does, with numpy, PIL,
jinja2 and tokenizers only.

`Preprocessor(folder).encode(text, images)` returns exactly what
`AutoProcessor.from_pretrained(folder)(text=[text], images=[images], return_tensors="np")` returns (transformers 5,
`Idefics3ImageProcessorPil`), except that `pixel_attention_mask` is bool (transformers gives int64 0/1), which is
what the vision encoder graph takes. The image steps mirror the library's one for one, because with LANCZOS
resampling any shortcut (skipping the resize to whole tiles, resizing the global image from anything but the
uint8 image) changes the pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from .images import on_white

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_IMAGE_SIZE = 4096  # the image processor's absolute cap on a resized edge
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Idefics3ImageProcessorPil's class defaults, for keys a preprocessor_config.json leaves out.
IMAGE_DEFAULTS = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"longest_edge": 4 * 364},
    "resample": Image.Resampling.LANCZOS,
    "do_image_splitting": True,
    "max_image_size": {"longest_edge": 364},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_pad": True,
}


@dataclass
class Encoded:
    input_ids: np.ndarray  # int64 [1, T]
    attention_mask: np.ndarray  # int64 [1, T]
    pixel_values: np.ndarray | None  # [1, N, 3, H, W] in Preprocessor.pixel_dtype; None when the prompt has no image
    pixel_attention_mask: np.ndarray | None  # bool [1, N, H, W]   (both None too when encode(pad=False))
    image_pixels: tuple[np.ndarray, ...] = ()  # each image's tiles [n, 3, h, w], in order, unpadded and read-only
    image_digests: tuple[bytes, ...] = ()  # image_digest of each image, in order


@dataclass
class TiledImage:
    """One image's tiles (Preprocessor.image_tiles, stacked and read-only: requests share them) as the tile cache
    keeps them."""

    pixels: np.ndarray  # [n, 3, h, w]
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes


def image_digest(image: Image.Image, pixel_dtype) -> bytes:
    """A blake2b hash of a decoded image's pixels (mode, size, bytes) and the dtype its tiles are made in: what the
    tiles depend on, given a Preprocessor's settings."""
    digest = hashlib.blake2b(f"{image.mode}{image.size}{np.dtype(pixel_dtype).name}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.digest()


class Preprocessor:
    """Chat template, image tiling and tokenization of an export folder (see the module docstring)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        image_config = {**IMAGE_DEFAULTS, **_read_json(folder / "preprocessor_config.json")}
        model_config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")

        self.special_tokens = {
            key: _token_content(tokenizer_config[key]) for key in NAMED_SPECIAL_TOKENS if tokenizer_config.get(key) is not None
        }
        self.tokenizer = _load_tokenizer(folder / "tokenizer.json", tokenizer_config, self.special_tokens)
        self._template = _compile_template(_chat_template(folder, tokenizer_config))

        self.image_seq_len = int(_read_json(folder / "processor_config.json")["image_seq_len"])
        # What the vision graph takes (smolbox.serve.engine sets it from the graph: float32 for every exported variant, as
        # in the published files; float16 for a graph that declares it); the library returns float32.
        self.pixel_dtype = np.float32
        self._tables: dict[tuple, np.ndarray] = {}
        # The server sets an LRU (get/put by image_digest, values' nbytes) of recent images' tiles, so an image sent
        # again (every later turn of a chat resends it) is not resized and tiled again; None = no cache.
        self.tile_cache = None
        self.image_token_id = model_config.get("image_token_id", self.tokenizer.token_to_id(IMAGE_TOKEN))
        # Generation stops on generation_config's eos ids, as in smolbox.runtime.
        text_config = model_config.get("text_config", {})
        eos = generation.get("eos_token_id", text_config.get("eos_token_id"))
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) - {None}
        # The processor pads with the tokenizer's pad token; pad_batch should too.
        pad = self.tokenizer.token_to_id(self.special_tokens["pad_token"]) if "pad_token" in self.special_tokens else None
        self.pad_token_id: int = pad if pad is not None else generation.get("pad_token_id") or 0

        self.image_config = image_config
        if not image_config["do_pad"]:
            raise ValueError(f"{folder}: do_pad=false is not supported: the vision encoder needs pixel_attention_mask")
        for key in ("size", "max_image_size"):
            if "longest_edge" not in image_config[key]:
                raise ValueError(f"{folder}: preprocessor_config.json {key} must have 'longest_edge', got {image_config[key]}")

    # ---- text ---------------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string, as `processor.apply_chat_template(messages, add_generation_prompt=...)` renders it."""
        return self._template.render(
            messages=_normalize_messages(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode(self, text: str, images: list[Image.Image] | None = None, pad: bool = True) -> Encoded:
        """Model inputs for one prompt: each `<image>` in `text` takes the next image of `images`, in order.
        pad=False leaves out the padded pixel batch (pixel_values, pixel_attention_mask): the server reads each
        image's tiles (image_pixels) alone, and building the batch only to cut it up again cost a request most of
        its preparation time when its image was in the tile cache (docs/benchmarks.md, lease 12)."""
        images = list(images or [])
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} tokens but {len(images)} images were given")
        tiled_images: list[TiledImage] = []
        digests: list[bytes] = []
        expanded = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            digests.append(image_digest(image, self.pixel_dtype))
            tiled = self.tile_cache.get(digests[-1]) if self.tile_cache is not None else None
            if tiled is None:
                image_tiles, rows, cols = self.image_tiles(image)
                pixels = np.stack(image_tiles)  # every tile of one image has one size
                pixels.flags.writeable = False
                tiled = TiledImage(pixels, rows, cols)
                if self.tile_cache is not None:
                    self.tile_cache.put(digests[-1], tiled)
            tiled_images.append(tiled)
            expanded += [self.image_prompt(tiled.rows, tiled.cols), piece]

        ids = np.array([self.tokenizer.encode("".join(expanded)).ids], dtype=np.int64)
        encoded = Encoded(ids, np.ones_like(ids), None, None, tuple(t.pixels for t in tiled_images), tuple(digests))
        if tiled_images and pad:
            encoded.pixel_values, encoded.pixel_attention_mask = stack_tiles(encoded.image_pixels)
        return encoded

    def image_prompt(self, rows: int, cols: int) -> str:
        """The text that replaces one `<image>`: a row-major grid of tiles (if split), then the global image."""
        image = IMAGE_TOKEN * self.image_seq_len
        global_image = f"{FAKE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image}{FAKE_TOKEN}"
        if rows == 0 and cols == 0:
            return global_image
        grid = "".join("".join(f"{FAKE_TOKEN}<row_{r}_col_{c}>{image}" for c in range(1, cols + 1)) + "\n" for r in range(1, rows + 1))
        return f"{grid}\n{global_image}"

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # transformers skips clean_up_tokenization_spaces for BPE tokenizers, which SmolVLM's are.
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    # ---- images -------------------------------------------------------------------------------------------

    def image_tiles(self, image: Image.Image) -> tuple[list[np.ndarray], int, int]:
        """CHW tiles in pixel_dtype (row-major, global image last; just the image if it fits one tile), rows, cols."""
        cfg = self.image_config
        resample = cfg["resample"]
        tile = cfg["max_image_size"]["longest_edge"]
        # The library resizes through PIL images rebuilt from uint8 arrays; rebuilding once gives the same modes
        # (a palette image without RGB conversion, for one, becomes mode L).
        pil = Image.fromarray(_to_array(image, cfg["do_convert_rgb"]))
        if cfg["do_resize"]:
            pil = pil.resize(_resized_size(pil.width, pil.height, cfg["size"]["longest_edge"]), resample)

        rows = cols = 0
        if cfg["do_image_splitting"]:
            pil = pil.resize(_tile_multiple_size(pil.width, pil.height, tile), resample)
            if pil.height > tile or pil.width > tile:
                rows, cols = (pil.height - tile) // tile + 1, (pil.width - tile) // tile + 1
                crops = [pil.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
                frames = [*crops, pil.resize((tile, tile), resample)]
            else:
                frames = [pil]
        else:
            frames = [pil.resize((tile, tile), resample)]
        return [self._normalize(_chw(frame)) for frame in frames], rows, cols

    def _normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Rescaled and normalized CHW pixels in `pixel_dtype`. uint8 pixels (the usual case) are looked up in a
        table of the 256 results per channel: the same arithmetic, bit for bit, a fraction of the time, and it
        writes fp16 directly for a graph that takes fp16, instead of a later cast of the whole array (its cost for a
        full-size image: docs/notes.md)."""
        if pixels.dtype != np.uint8:
            return self._normalize_values(pixels).astype(self.pixel_dtype, copy=False)
        key = (pixels.shape[0], np.dtype(self.pixel_dtype).name)
        if key not in self._tables:
            levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (pixels.shape[0], 256, 1))
            self._tables[key] = self._normalize_values(levels)[:, :, 0].astype(self.pixel_dtype)
        table = self._tables[key]
        out = np.empty((table.shape[0], *pixels.shape[1:]), dtype=table.dtype)
        for channel in range(table.shape[0]):  # a grayscale image broadcasts to every channel, as in the library
            np.take(table[channel], pixels[min(channel, pixels.shape[0] - 1)], out=out[channel])
        return out

    def _normalize_values(self, pixels: np.ndarray) -> np.ndarray:
        cfg = self.image_config
        if cfg["do_rescale"]:  # the library multiplies in float64, then rounds to float32
            pixels = (pixels.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
        pixels = pixels.astype(np.float32, copy=False)
        if cfg["do_normalize"]:
            mean = np.array(cfg["image_mean"], dtype=np.float32)[:, None, None]
            std = np.array(cfg["image_std"], dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels


def pad_batch(encodings: list[Encoded], pad_token_id: int) -> dict[str, np.ndarray]:
    """Left-pad the text of several encodings, and pad their images with all-zero images (mask False) to one shape.

    Equals `processor(text=[...], images=[[...], ...], padding=True, padding_side="left", return_tensors="np")` when
    every row has images; a row without images gets only zero images, which the vision encoder drops.
    """
    length = max(e.input_ids.shape[1] for e in encodings)
    input_ids = np.full((len(encodings), length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(encodings), length), dtype=np.int64)
    for row, e in enumerate(encodings):
        n = e.input_ids.shape[1]
        input_ids[row, length - n :] = e.input_ids[0]
        attention_mask[row, length - n :] = e.attention_mask[0]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if any(e.pixel_values is not None for e in encodings):
        images = [[] if e.pixel_values is None else list(e.pixel_values[0]) for e in encodings]
        masks = [[] if e.pixel_attention_mask is None else list(e.pixel_attention_mask[0]) for e in encodings]
        batch.update(pad_images(images, masks))
    return batch


def stack_tiles(images: list[np.ndarray] | tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of several images ([n, 3, h, w] each) as one vision-encoder input [1, N, 3, H, W], each zero-padded to
    the largest height and width, and the mask of its real pixels [1, N, H, W]."""
    batch = pad_images([[tile for image in images for tile in image]])
    return batch["pixel_values"], batch["pixel_attention_mask"]


def pad_images(images: list[list[np.ndarray]], masks: list[list[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """[B, N, C, H, W] zeros padded to the most images and the largest H, W; the mask says which pixels are real."""
    all_images = [image for row in images for image in row]
    channels = all_images[0].shape[0]
    height = max(image.shape[1] for image in all_images)
    width = max(image.shape[2] for image in all_images)
    count = max(len(row) for row in images)
    pixel_values = np.zeros((len(images), count, channels, height, width), dtype=all_images[0].dtype)
    pixel_mask = np.zeros((len(images), count, height, width), dtype=bool)
    for b, row in enumerate(images):
        for n, image in enumerate(row):
            h, w = image.shape[1:]
            pixel_values[b, n, :, :h, :w] = image
            pixel_mask[b, n, :h, :w] = True if masks is None else masks[b][n][:h, :w]
    return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}


# ---- image geometry (the library's integer arithmetic, kept step for step) ----------------------------------


def _resized_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) with the longest edge at `longest_edge`, up or down; the other edge rounded up to even."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Then no edge above MAX_IMAGE_SIZE (only reachable with a larger longest_edge).
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(width, 1), max(height, 1)


def _tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to whole tiles, the short edge derived from the rounded long edge."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def _to_array(image: Image.Image, convert_rgb: bool) -> np.ndarray:
    """HWC (or HW) uint8; RGB conversion composites transparency onto white, as the library does."""
    if not convert_rgb:
        return np.array(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:  # the library's test for transparency
        return np.array(on_white(image))
    return np.array(image.convert("RGB"))


def _chw(image: Image.Image) -> np.ndarray:
    pixels = np.array(image)
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)


# ---- tokenizer and chat template ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token) -> str:
    return token["content"] if isinstance(token, dict) else token


def _load_tokenizer(path: Path, config: dict, special_tokens: dict[str, str]) -> Tokenizer:
    # tokenizer.json's post-processor decides about BOS/EOS: transformers drops add_bos_token / add_eos_token from
    # tokenizer_config.json whenever tokenizer.json exists.
    tokenizer = Tokenizer.from_file(str(path))
    # A plain processor call neither truncates nor pads one text, whatever tokenizer.json says.
    tokenizer.no_truncation()
    tokenizer.no_padding()

    # transformers makes every configured special token, and the processor its image tokens, an added special
    # token, so that they always encode as one id and decode(skip_special_tokens=True) drops them.
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = extra.values() if isinstance(extra, dict) else extra
    wanted = [*special_tokens.values(), *map(_token_content, extra), FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE]
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = list(dict.fromkeys(t for t in wanted if t not in present))
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tokenizer


def _chat_template(folder: Path, tokenizer_config: dict) -> str:
    """The processor's template: chat_template.jinja, else chat_template.json, else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or tokenizer_config.get("chat_template")
    if not template:
        raise ValueError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")
    return template


def _compile_template(template: str):
    """The environment transformers renders chat templates in: sandboxed, trim/lstrip blocks, its helpers."""

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _normalize_messages(messages: list[dict]) -> list[dict]:
    """As the processor does before rendering: drop keys whose value is None, turn OpenAI image_url parts into
    image parts."""
    normalized = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_image_url_part(part) for part in message["content"]]
        normalized.append(message)
    return normalized


def _image_url_part(part):
    if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
        url = part["image_url"]
        return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
    return part
