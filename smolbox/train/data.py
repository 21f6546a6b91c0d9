"""Preference data: load a split from the hub, a local folder or a file, clean every row, and say what was dropped.

Rows come out in the HuggingFaceH4/rlaif-v_formatted schema with RGB images shrunk to `image_max_size`. A row that
cannot be used is never dropped silently: it is counted by reason (on_bad_row=skip) or stops the load (fail).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import LargeList, List, Value
from PIL import Image, ImageOps

from .. import tiny
from ..config import DataConfig
from ..env import cpu_count
from ..images import on_white
from ..preference_schema import COLUMNS, features

log = logging.getLogger("smolbox.data")

# Columns the cleaning map adds for bookkeeping; removed before the split is returned.
_BAD_REASON, _BAD_DETAIL, _ROW_DIGEST = "_bad_reason", "_bad_detail", "_row_sha256"
_MAP_FEATURES = features(**{_BAD_REASON: Value("string"), _BAD_DETAIL: Value("string"), _ROW_DIGEST: Value("string")})
_EMPTY_ROW = {name: [] for name in COLUMNS}
_SPLIT_RE = re.compile(r"^(?P<name>\w+(?:\.\w+)*)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")
# Part of the map's cache key, so a changed cleaner never reuses rows cleaned by an older one.
_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@dataclass
class PreferenceSplit:
    dataset: datasets.Dataset  # cleaned rows, columns exactly: images, prompt, chosen, rejected
    source: str  # what was loaded: "<id>[@revision]:<split>"
    rows_in: int  # rows read from the source split
    skipped: dict[str, int]  # reason -> count of rows dropped
    fingerprint: str  # sha256 hex over the cleaned content (texts + image bytes), stable across runs


class DataError(ValueError):
    """Data that cannot be used: a bad source or split, no rows, or a bad row with on_bad_row=fail."""


def load_preference_data(cfg: DataConfig, split: str) -> PreferenceSplit:
    """Load `split` (e.g. "train[:6%]") of `cfg.id`, clean every row and return what is left with its accounting."""
    source = f"{cfg.id}{'@' + cfg.revision if cfg.revision else ''}:{split}"
    raw, base_dir = _load_source(cfg, split)
    if len(raw) == 0:
        raise DataError(f"{source}: the split has no rows")
    missing = [name for name in COLUMNS if name not in raw.column_names]
    if missing:
        raise DataError(f"{source}: no column(s) {missing}; the data has {raw.column_names}")

    images_feature = raw.features["images"]
    undecoded = _without_image_decoding(images_feature)
    if undecoded != images_feature:  # decoding here would crash on a bad image instead of counting it
        raw = raw.cast_column("images", undecoded)  # inside a List this rewrites the column once (cached)

    cleaner = _RowCleaner(str(base_dir) if base_dir else None, cfg.max_image_pixels, cfg.image_max_size)
    workers = min(cfg.num_proc or min(8, cpu_count()), len(raw))
    cleaned = raw.map(
        cleaner,
        remove_columns=raw.column_names,
        features=_MAP_FEATURES,
        num_proc=workers if workers > 1 else None,
        desc=f"Cleaning {source}",
    )

    reasons = list(cleaned[_BAD_REASON])
    bad_rows = [i for i, reason in enumerate(reasons) if reason is not None]
    # Bad rows are judged after the map so "fail" always names the first bad row, whatever num_proc is.
    if bad_rows and cfg.on_bad_row == "fail":
        first = bad_rows[0]
        raise DataError(f"{source}: row {first}: {reasons[first]}: {cleaned[first][_BAD_DETAIL]}")
    skipped = _report_skipped(cleaned, reasons, bad_rows, source)
    if len(bad_rows) == len(raw):
        raise DataError(f"{source}: no rows left: all {len(raw)} rows are bad ({skipped})")

    if bad_rows:
        cleaned = cleaned.select([i for i, reason in enumerate(reasons) if reason is None])
    fingerprint = hashlib.sha256(b"".join(bytes.fromhex(d) for d in cleaned[_ROW_DIGEST])).hexdigest()
    dataset = cleaned.remove_columns([_BAD_REASON, _BAD_DETAIL, _ROW_DIGEST])
    log.info("%s: %d rows read, %d kept, fingerprint %s", source, len(raw), len(dataset), fingerprint[:16])
    return PreferenceSplit(dataset=dataset, source=source, rows_in=len(raw), skipped=skipped, fingerprint=fingerprint)


def _report_skipped(cleaned: datasets.Dataset, reasons: list[str | None], bad_rows: list[int], source: str) -> dict[str, int]:
    counts = Counter(reasons[i] for i in bad_rows)
    for reason, count in sorted(counts.items()):
        first = next(i for i in bad_rows if reasons[i] == reason)
        log.warning(
            "%s: skipped %d row(s): %s (first: row %d: %s)", source, count, reason, first, cleaned[first][_BAD_DETAIL]
        )
    return dict(sorted(counts.items()))


# --- sources -------------------------------------------------------------------------------------------------


def _load_source(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, Path | None]:
    """The sliced split and the folder that relative image paths are relative to (None for hub data).

    The whole named split is loaded and sliced here for every kind of source: `datasets` raises ValueError on an
    empty slice ("corresponds to no data") instead of returning no rows, and selecting a row range copies nothing.
    """
    split_name, start, stop = _parse_split(split)
    location = Path(tiny.resolve(cfg.id, "data"))
    if location.is_dir():
        base_dir = location
        if (location / "state.json").is_file() or (location / "dataset_dict.json").is_file():
            full = datasets.load_from_disk(str(location))
            if isinstance(full, datasets.DatasetDict):
                if split_name not in full:
                    raise DataError(f"{location}: no split '{split_name}'; it has {list(full)}")
                full = full[split_name]
        else:
            full = datasets.load_dataset(str(location), split=split_name)
    elif location.is_file():
        builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(location.suffix.lower())
        if builder is None:
            raise DataError(f"{location}: unsupported data file; use .parquet, .jsonl or .json")
        if location.stat().st_size == 0:  # datasets fails on these with an unhelpful StopIteration
            raise DataError(f"{location}: the file is empty")
        base_dir = location.parent
        full = datasets.load_dataset(builder, data_files={split_name: str(location)}, split=split_name)
    else:
        base_dir = None
        full = datasets.load_dataset(cfg.id, split=split_name, revision=cfg.revision)
    return _apply_slice(full, start, stop), base_dir


def _parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """'train[10:50%]' -> ('train', '10', '50%'). Bounds stay strings until the split's length is known."""
    match = _SPLIT_RE.match(spec.strip())
    if not match:
        raise DataError(f"bad split spec '{spec}': expected NAME, NAME[START:STOP] with ints or percents, e.g. train[:6%]")
    return match["name"], match["start"], match["stop"]


def _apply_slice(dataset: datasets.Dataset, start: str | None, stop: str | None) -> datasets.Dataset:
    total = len(dataset)
    first = _slice_bound(start, total, default=0)
    end = _slice_bound(stop, total, default=total)
    return dataset.select(range(first, max(first, end)))


def _slice_bound(bound: str | None, total: int, default: int) -> int:
    """Same arithmetic as `datasets` split slicing: percents round to the closest row, negatives count from the end."""
    if bound is None:
        return default
    value = int(round(int(bound[:-1]) * total / 100)) if bound.endswith("%") else int(bound)
    if value < 0:
        value = max(total + value, 0)
    return min(value, total)


def _without_image_decoding(feature: Any) -> Any:
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, List):
        return List(_without_image_decoding(feature.feature), length=feature.length)
    if isinstance(feature, LargeList):
        return LargeList(_without_image_decoding(feature.feature))
    return feature


# --- rows ----------------------------------------------------------------------------------------------------


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class _RowCleaner:
    """The map function; a picklable object, so its settings (and the code digest) are part of the map's cache key."""

    base_dir: str | None
    max_image_pixels: int
    image_max_size: int
    code_digest: str = field(default=_CODE_DIGEST)

    def __call__(self, row: dict) -> dict:
        try:
            cleaned = self._clean(row)
        except BadRow as bad:
            return {**_EMPTY_ROW, _BAD_REASON: bad.reason, _BAD_DETAIL: bad.detail, _ROW_DIGEST: None}
        return {**cleaned, _BAD_REASON: None, _BAD_DETAIL: None, _ROW_DIGEST: _row_digest(cleaned)}

    def _clean(self, row: dict) -> dict:
        for name in COLUMNS:
            if row.get(name) is None:
                raise BadRow("missing_field", f"'{name}' is missing")
        prompt = _messages(row["prompt"], "prompt")
        chosen = _messages(row["chosen"], "chosen")
        rejected = _messages(row["rejected"], "rejected")
        if not any(message["role"] == "user" for message in prompt):
            raise BadRow("bad_message_shape", "prompt has no user message")
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if any(message["role"] != "assistant" for message in messages):
                raise BadRow("bad_message_shape", f"{name} has a message that is not from the assistant")
            # Images belong to the prompt; one in a response would not match the images column.
            if any(part["type"] == "image" for message in messages for part in message["content"]):
                raise BadRow("bad_message_shape", f"{name} has an image part")

        images = row["images"]
        if not isinstance(images, list) or not images:
            raise BadRow("no_image", "images is not a non-empty list")
        image_parts = sum(part["type"] == "image" for message in prompt for part in message["content"])
        if image_parts != len(images):
            raise BadRow("image_count_mismatch", f"prompt has {image_parts} image part(s) for {len(images)} image(s)")
        encoded = [
            {"bytes": clean_image(value, self.base_dir, self.max_image_pixels, self.image_max_size), "path": None}
            for value in images
        ]
        return {"images": encoded, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _messages(value: Any, name: str) -> list[dict]:
    """Validated messages with content in list-of-parts form; every part has both 'type' and 'text'."""
    if not isinstance(value, list) or not value:
        raise BadRow("bad_message_shape", f"{name} is not a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRow("bad_message_shape", f"{where} has no string 'role'")
        messages.append({"role": message["role"], "content": _content_parts(message.get("content"), where)})
    return messages


def _content_parts(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRow("bad_message_shape", f"{where} content is neither a string nor a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image", "text": None})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise BadRow("bad_message_shape", f"{where} has a part that is neither an image nor a text with a string 'text'")
    return parts


def _row_digest(row: dict) -> str:
    texts = json.dumps({name: row[name] for name in COLUMNS[1:]}, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(texts.encode())
    for image in row["images"]:
        digest.update(len(image["bytes"]).to_bytes(8, "big"))  # length prefix: no two rows hash alike by shifting bytes
        digest.update(image["bytes"])
    return digest.hexdigest()


# --- images --------------------------------------------------------------------------------------------------


def clean_image(value: Any, base_dir: str | None, max_image_pixels: int, image_max_size: int) -> bytes:
    """PNG bytes of the image as RGB, shrunk to fit image_max_size; raises BadRow for an image we will not use."""
    with _pil_pixel_limit_disabled(), _open_image(value, base_dir) as image:
        _check_size(image.size, max_image_pixels)  # from the header: a huge image is refused before it is decoded
        try:
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))  # datasets' own decoding applies EXIF orientation too
        except Exception as exc:  # any decoder failure on untrusted bytes is a bad row, not a crash
            raise BadRow("undecodable_image", _describe(exc)) from None
    rgb.thumbnail((image_max_size, image_max_size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")  # lossless and deterministic, so the fingerprint is stable
    return buffer.getvalue()


@contextlib.contextmanager
def _pil_pixel_limit_disabled():
    """PIL refuses or warns about 'decompression bombs' on its own; max_image_pixels decides here instead."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_image(value: Any, base_dir: str | None):
    """A context manager giving the image with only its header read. PIL images passed in are not closed."""
    if isinstance(value, Image.Image):
        return contextlib.nullcontext(value)
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        source = io.BytesIO(value)
    elif isinstance(value, str):
        source = Path(value) if Path(value).is_absolute() or base_dir is None else Path(base_dir) / value
    else:
        raise BadRow("undecodable_image", f"no image bytes or path in {type(value).__name__} value")
    try:
        return Image.open(source)
    except Exception as exc:
        raise BadRow("undecodable_image", _describe(exc)) from None


def _check_size(size: tuple[int, int], max_image_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadRow("zero_size_image", f"image is {width}x{height}")
    if width * height > max_image_pixels:
        raise BadRow("image_too_large", f"image is {width}x{height} = {width * height} pixels > max_image_pixels {max_image_pixels}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_gray(image)
    if image.has_transparency_data:  # alpha channel, palette alpha or a 'transparency' colour: put it on white
        return on_white(image)
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """I;16 maps its fixed 0..65535 range to 0..255. I and F have no fixed range, so their own min..max is used."""
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode.startswith("I;16"):
        scaled = pixels / 257
    else:
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255 / (high - low)) if high > low else pixels
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
