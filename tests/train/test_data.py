"""Preference data loading and cleaning, on real files: parquet, JSONL with image paths, save_to_disk folders."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import zlib

import datasets
import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from smolbox import tiny
from smolbox.config import DataConfig, load_config
from smolbox.preference_schema import features
from smolbox.train.data import BadRow, DataError, PreferenceSplit, clean_image, load_preference_data

RLAIF_FEATURES = features()
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path_factory, monkeypatch):
    """load_dataset caches what it reads; keep that out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))


def encode(image: Image.Image, fmt: str = "PNG", **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def solid(color, size=(4, 4)) -> bytes:
    return encode(Image.new("RGB", size, color))


def row(images, answer="yes", image_parts=None, chosen_role="assistant") -> dict:
    """One rlaif-v_formatted row; images are {"bytes", "path"} values, one image part per image unless told."""
    parts = [{"type": "image", "text": None}] * (len(images) if image_parts is None else image_parts)
    return {
        "images": [{"bytes": b, "path": None} for b in images],
        "prompt": [{"role": "user", "content": parts + [{"type": "text", "text": "What is shown?"}]}],
        "chosen": [{"role": chosen_role, "content": [{"type": "text", "text": answer}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "no idea"}]}],
    }


def write_parquet(rows, path):
    Dataset.from_list(rows, features=RLAIF_FEATURES).to_parquet(path)
    return path


def config(path, **overrides) -> DataConfig:
    return DataConfig(**{"id": str(path), "num_proc": 1, "image_max_size": 64, **overrides})


def pixels(image: Image.Image) -> list:
    return [image.getpixel((x, 0)) for x in range(image.width)]


def png_header_only(width: int, height: int, bit_depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height; idat is the (possibly truncated) compressed pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def blank_png(width: int, height: int) -> bytes:
    """A real, decodable 1-bit PNG: large in pixels, tiny on disk."""
    scanlines = (b"\x00" + bytes((width + 7) // 8)) * height
    return png_header_only(width, height, bit_depth=1, color_type=0, idat=zlib.compress(scanlines, 9))


# --- image modes and sizes -----------------------------------------------------------------------------------


def mode_samples() -> dict[str, tuple[bytes, list]]:
    """mode -> (encoded image, expected RGB pixels of its single row)."""
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    palette = Image.new("P", (2, 1))
    palette.putpalette([*RED, *GREEN])
    palette.putdata([0, 1])
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (50, 255)])
    sixteen_bit = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32))  # F has no fixed range: min..max is used
    one_bit = Image.new("1", (2, 1))
    one_bit.putdata([0, 255])
    return {
        "RGBA": (encode(rgba), [WHITE, BLUE, (127, 127, 127)]),
        "P+transparency": (encode(palette, transparency=0), [WHITE, GREEN]),  # index 0 (red) is see-through
        "L": (encode(Image.new("L", (2, 1), 77)), [(77, 77, 77)] * 2),
        "LA": (encode(la), [WHITE, (50, 50, 50)]),
        "CMYK": (encode(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"), [RED] * 2),
        "I;16": (encode(sixteen_bit), [(0, 0, 0), (100, 100, 100), WHITE]),
        "F": (encode(floats, "TIFF"), [(0, 0, 0), (128, 128, 128), WHITE]),
        "1": (encode(one_bit), [(0, 0, 0), WHITE]),
    }


@pytest.fixture(scope="module")
def cleaned_modes(tmp_path_factory):
    samples = mode_samples()
    for mode, (data, _) in samples.items():  # the files really are in the mode under test
        opened = Image.open(io.BytesIO(data))
        assert opened.mode == mode.split("+")[0], mode
    folder = tmp_path_factory.mktemp("modes") / "saved"
    Dataset.from_list([row([data], answer=mode) for mode, (data, _) in samples.items()], features=RLAIF_FEATURES).save_to_disk(folder)
    loaded = load_preference_data(config(folder), "train")
    return {r["chosen"][0]["content"][0]["text"]: r["images"][0] for r in loaded.dataset}


@pytest.mark.parametrize("mode", ["RGBA", "P+transparency", "L", "LA", "CMYK", "I;16", "F", "1"])
def test_every_image_mode_becomes_rgb_with_the_right_colours(cleaned_modes, mode):
    image = cleaned_modes[mode]
    assert image.mode == "RGB"
    expected = mode_samples()[mode][1]
    assert np.allclose(pixels(image), expected, atol=1), (pixels(image), expected)


def test_images_shrink_to_fit_and_are_never_enlarged(tmp_path):
    rows = [row([solid(RED, (200, 100))], "wide"), row([solid(RED, (30, 120))], "tall"), row([solid(RED, (20, 10))], "small")]
    split = load_preference_data(config(write_parquet(rows, tmp_path / "d.parquet"), image_max_size=50), "train")
    sizes = {r["chosen"][0]["content"][0]["text"]: r["images"][0].size for r in split.dataset}
    assert sizes["wide"] == (50, 25)
    assert max(sizes["tall"]) == 50 and sizes["tall"][1] == 50
    assert sizes["small"] == (20, 10)


def test_zero_size_image_is_its_own_reason():
    # PIL refuses to open any file whose header says 0 wide or high, so only an in-memory image can be empty.
    with pytest.raises(BadRow) as caught:
        clean_image(Image.new("RGB", (0, 5)), None, max_image_pixels=1000, image_max_size=64)
    assert caught.value.reason == "zero_size_image"


def test_pil_image_values_are_cleaned_and_left_open():
    original = Image.new("RGBA", (100, 10), (0, 0, 255, 255))
    cleaned = Image.open(io.BytesIO(clean_image(original, None, max_image_pixels=10_000, image_max_size=50)))
    assert (cleaned.mode, cleaned.size, cleaned.getpixel((0, 0))) == ("RGB", (50, 5), BLUE)
    assert original.getpixel((0, 0)) == (0, 0, 255, 255)  # still usable by the caller


def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    # 100k x 100k with no pixel data: decoding would fail, and PIL's own bomb guard would raise at open.
    huge = png_header_only(100_000, 100_000, idat=b"\x78\x9c")
    rows = [row([solid(RED)], "ok"), row([huge], "huge")]
    limit_before = Image.MAX_IMAGE_PIXELS
    split = load_preference_data(config(write_parquet(rows, tmp_path / "d.parquet")), "train")
    assert split.skipped == {"image_too_large": 1}
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's limit is only lifted while we read an image


# --- sources -------------------------------------------------------------------------------------------------


def test_jsonl_source_with_relative_and_absolute_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "green.png").write_bytes(solid(GREEN))
    (tmp_path / "blue.png").write_bytes(solid(BLUE))
    lines = [
        {
            "images": [path],
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]}],
            "chosen": [{"role": "assistant", "content": answer}],  # plain-string content
            "rejected": [{"role": "assistant", "content": "red"}],
            "extra": 1,
        }
        for path, answer in (("imgs/green.png", "green"), (str(tmp_path / "blue.png"), "blue"))
    ]
    data_file = tmp_path / "prefs.jsonl"
    data_file.write_text("".join(json.dumps(line) + "\n" for line in lines))

    split = load_preference_data(config(data_file), "train")

    assert isinstance(split, PreferenceSplit)
    assert (split.source, split.rows_in, split.skipped) == (f"{data_file}:train", 2, {})
    assert split.dataset.column_names == ["images", "prompt", "chosen", "rejected"]
    first, second = split.dataset[0], split.dataset[1]
    assert first["images"][0].getpixel((0, 0)) == GREEN and second["images"][0].getpixel((0, 0)) == BLUE
    assert first["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "green"}]}]
    assert first["prompt"][0]["content"][0] == {"type": "image", "text": None}


def test_parquet_source_with_image_bytes_has_the_rlaif_schema(tmp_path):
    rows = tiny.preference_rows(6, seed=3)
    data_file = write_parquet(rows, tmp_path / "prefs.parquet")

    # Any split name keys a single file; 512 leaves the images at their own size.
    split = load_preference_data(config(data_file, image_max_size=512), "validation[:4]")

    assert (split.rows_in, len(split.dataset), split.skipped) == (4, 4, {})
    assert split.dataset.features == RLAIF_FEATURES
    for cleaned, original in zip(split.dataset, rows):
        assert cleaned["prompt"] == original["prompt"] and cleaned["chosen"] == original["chosen"]
        assert cleaned["images"][0].mode == "RGB"
        assert cleaned["images"][0].size == Image.open(io.BytesIO(original["images"][0]["bytes"])).size


def numbered_rows(n: int) -> list[dict]:
    """Rows with raw-bytes images (a binary column, not an Image feature) and a unique answer each."""
    return [{**row([solid((i, 0, 0))], answer=f"answer {i}"), "images": [solid((i, 0, 0))]} for i in range(n)]


def answers(split: PreferenceSplit) -> list[str]:
    return [r["chosen"][0]["content"][0]["text"] for r in split.dataset]


@pytest.fixture
def saved_dict(tmp_path):
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(numbered_rows(10)), "test": Dataset.from_list(numbered_rows(4))}).save_to_disk(folder)
    return folder


@pytest.mark.parametrize(
    "spec, expected",
    [("train[:50%]", range(0, 5)), ("train[2:5]", range(2, 5)), ("train[-2:]", range(8, 10)), ("train[70%:]", range(7, 10)), ("test", range(4))],
)
def test_save_to_disk_folder_with_slices(saved_dict, spec, expected):
    split = load_preference_data(config(saved_dict), spec)
    assert answers(split) == [f"answer {i}" for i in expected]
    assert split.rows_in == len(expected)
    assert split.dataset[0]["images"][0].getpixel((0, 0)) == (expected[0], 0, 0)


@pytest.mark.parametrize("spec", ["train[25%:75%]", "train[:33%]", "train[-35%:-15%]", "train[3:-3]"])
def test_save_to_disk_slices_match_datasets_own_slicing(saved_dict, tmp_path, spec):
    parquet_copy = tmp_path / "train.parquet"
    datasets.load_from_disk(str(saved_dict))["train"].to_parquet(parquet_copy)
    hf_sliced = datasets.load_dataset("parquet", data_files={"train": str(parquet_copy)}, split=spec)
    ours = load_preference_data(config(saved_dict), spec)
    assert answers(ours) == [r["chosen"][0]["content"][0]["text"] for r in hf_sliced]


def test_single_saved_dataset_and_unknown_split(saved_dict, tmp_path):
    single = tmp_path / "single"
    Dataset.from_list(numbered_rows(3)).save_to_disk(single)
    assert answers(load_preference_data(config(single), "train[1:]")) == ["answer 1", "answer 2"]
    with pytest.raises(DataError, match=r"no split 'validation'.*\['train', 'test'\]"):
        load_preference_data(config(saved_dict), "validation")


@pytest.mark.parametrize("spec", ["train[a:b]", "train[1]", "train+test", ""])
def test_bad_split_spec_is_a_data_error(saved_dict, spec):
    with pytest.raises(DataError, match="bad split spec"):
        load_preference_data(config(saved_dict), spec)


def test_builtin_tiny_set_loads_with_the_rlaif_schema(tiny_bundle):
    data_cfg = load_config("tiny", env={}, dotenv=None).data

    split = load_preference_data(data_cfg, "test")

    assert (split.source, split.rows_in, split.skipped) == ("builtin:tiny:test", tiny.N_TEST, {})
    assert split.dataset.features == RLAIF_FEATURES
    for r in split.dataset:
        assert r["images"][0].mode == "RGB" and max(r["images"][0].size) <= data_cfg.image_max_size
        assert r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"


# --- bad rows ------------------------------------------------------------------------------------------------


def rows_with_every_bad_reason() -> list[dict]:
    good = solid(GREEN)
    missing = row([good], "missing")
    missing["chosen"] = None
    text_without_text = row([good], "shape")
    text_without_text["prompt"][0]["content"].append({"type": "text", "text": None})
    return [
        row([good], "good 0"),
        missing,
        row([good], "not assistant", chosen_role="user"),
        text_without_text,
        row([], "no image", image_parts=1),
        row([good, good], "two images, one part", image_parts=1),
        row([b"not an image"], "garbage bytes"),
        row([b""], "empty file"),
        row([blank_png(20_000, 10_000)], "200 megapixels"),
        row([good], "good 1"),
    ]


def test_skip_mode_counts_and_logs_every_bad_row_reason(tmp_path, caplog):
    data_file = write_parquet(rows_with_every_bad_reason(), tmp_path / "bad.parquet")

    with caplog.at_level(logging.WARNING, logger="smolbox.data"):
        split = load_preference_data(config(data_file), "train")

    assert split.skipped == {
        "missing_field": 1,
        "bad_message_shape": 2,
        "no_image": 1,
        "image_count_mismatch": 1,
        "undecodable_image": 2,
        "image_too_large": 1,
    }
    assert split.rows_in == 10 and answers(split) == ["good 0", "good 1"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == len(split.skipped)
    for reason in split.skipped:
        assert sum(reason in message for message in warnings) == 1, reason


def test_fail_mode_names_the_first_bad_row_and_its_reason(tmp_path):
    rows = [row([solid(RED)]), row([solid(RED)]), row([b"not an image"]), row([], image_parts=1)]
    data_file = write_parquet(rows, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"row 2: undecodable_image: cannot identify image file"):
        load_preference_data(config(data_file, on_bad_row="fail"), "train")
    # Row indices count within the loaded split, not the file.
    with pytest.raises(DataError, match=r"row 0: no_image"):
        load_preference_data(config(data_file, on_bad_row="fail"), "train[3:]")


def test_empty_sources_and_all_bad_rows_are_errors(tmp_path, saved_dict):
    with pytest.raises(DataError, match="has no rows"):
        load_preference_data(config(saved_dict), "test[:10%]")  # round(0.4) = 0 rows

    data_file = write_parquet([row([solid(RED)]), row([b"bad"])], tmp_path / "d.parquet")
    with pytest.raises(DataError, match="has no rows"):
        load_preference_data(config(data_file), "train[1:1]")
    with pytest.raises(DataError, match=r"no rows left: all 1 rows are bad \({'undecodable_image': 1}\)"):
        load_preference_data(config(data_file), "train[1:]")

    empty_file = tmp_path / "empty.jsonl"
    empty_file.touch()
    with pytest.raises(DataError, match="the file is empty"):
        load_preference_data(config(empty_file), "train")


def test_missing_column_and_unsupported_file_are_errors(tmp_path):
    no_chosen = tmp_path / "no_chosen.parquet"
    Dataset.from_list([row([solid(RED)])], features=RLAIF_FEATURES).remove_columns("chosen").to_parquet(no_chosen)
    with pytest.raises(DataError, match=r"no column\(s\) \['chosen'\]"):
        load_preference_data(config(no_chosen), "train")
    csv = tmp_path / "prefs.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file"):
        load_preference_data(config(csv), "train")


# --- fingerprint ---------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_follows_the_content(tmp_path):
    rows = tiny.preference_rows(6, seed=5)
    first_file = write_parquet(rows, tmp_path / "a.parquet")
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    second_file = shutil.copy(first_file, copy_dir / "a.parquet")  # a new path: cleaned afresh, not from the cache

    reference = load_preference_data(config(first_file), "train").fingerprint
    assert re.fullmatch("[0-9a-f]{64}", reference)
    assert load_preference_data(config(first_file), "train").fingerprint == reference
    assert load_preference_data(config(second_file, num_proc=2), "train").fingerprint == reference

    changed_text = [dict(r) for r in rows]
    changed_text[-1]["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": "Something else."}]}]
    changed_image = [dict(r) for r in rows]
    changed_image[0]["images"] = [{"bytes": solid(BLUE), "path": None}]
    for name, variant in (("text", changed_text), ("image", changed_image)):
        other = load_preference_data(config(write_parquet(variant, tmp_path / f"{name}.parquet")), "train")
        assert other.fingerprint != reference, name
    assert load_preference_data(config(first_file), "train[:5]").fingerprint != reference
