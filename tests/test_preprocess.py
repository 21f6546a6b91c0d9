"""smolbox.preprocess against the transformers processor it replaces: ids, masks and pixels must be equal."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, GenerationConfig, Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

from smolbox import tiny
from smolbox.export.folder import save_processor_files
from smolbox.preprocess import Preprocessor, pad_batch

REPO = Path(__file__).resolve().parents[1]
SIZES = [(1, 1), (7, 300), (64, 64), (65, 33), (512, 384), (1000, 1500), (1536, 1536), (2000, 100)]  # (width, height)
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency"]
REAL_EVERY_MODE = [(65, 33), (2000, 100)]  # one upscaled to 1536 px, one downscaled


def write_folder(folder: Path, processor, config) -> Path:
    """An export folder's processor files, config.json and generation_config.json."""
    save_processor_files(processor, folder)
    config.save_pretrained(folder)
    tokenizer = processor.tokenizer
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("tiny"), tiny.build_processor(), tiny.build_model().config)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    """SmolVLM-Instruct's image settings (1536-px images in 384-px tiles, 81 tokens each) on the tiny tokenizer,
    whose <row_i_col_j> tokens go up to 4x4: exactly the most tiles a 1536-px longest edge gives."""
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}, do_image_splitting=True, do_pad=True
    )
    tokenizer = tiny.build_tokenizer()
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=81, chat_template=tiny.CHAT_TEMPLATE)
    config = Idefics3Config(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=3,
                            vision_config={"patch_size": 14, "image_size": 384})
    return write_folder(tmp_path_factory.mktemp("real"), processor, config)


@pytest.fixture(scope="module", params=["tiny", "real"])
def pair(request):
    """(Preprocessor, the HF processor) loaded from the same folder."""
    folder = request.getfixturevalue(f"{request.param}_folder")
    return Preprocessor(folder), AutoProcessor.from_pretrained(folder)


def make_image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """Noise, the hardest case for exact resampling; transparent modes get a varied alpha."""
    pixels = np.random.default_rng(seed + width * 7919 + height).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P+transparency":
        image = image.convert("RGB").convert("P")
        image.info["transparency"] = 0
        return image
    return image.convert(mode)


def user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def assert_same(ours, theirs: dict, max_pixel_diff: float = 0.0):
    ours = ours if isinstance(ours, dict) else vars(ours)
    for key in ("input_ids", "attention_mask"):
        assert ours[key].dtype == np.int64
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    if "pixel_values" not in theirs:
        assert ours.get("pixel_values") is None and ours.get("pixel_attention_mask") is None
        return
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_attention_mask"].dtype == bool
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    np.testing.assert_array_equal(ours["pixel_attention_mask"], theirs["pixel_attention_mask"].astype(bool))
    assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() <= max_pixel_diff


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_matches_the_hf_processor(pair, size):
    """Every size in every mode at the tiny settings. At the real ones, where each image is up to 17 tiles, every mode
    at an upscaled and a downscaled size, the others opaque and with alpha: the mode is settled (converted to RGB,
    alpha composited) before the image is resized, so a mode does not meet a size's resampling on its own."""
    pre, hf = pair
    text = pre.render_chat([user(None, "What is it?")])
    real = pre.image_config["size"]["longest_edge"] > 1000
    for mode in MODES if not real or size in REAL_EVERY_MODE else ["RGB", "RGBA"]:
        image = make_image(*size, mode)
        assert_same(pre.encode(text, [image]), hf(text=[text], images=[[image]], return_tensors="np"))


def test_fp16_pixels_equal_the_float32_ones_cast(pair):
    """For fp16 graphs the preprocessor writes fp16 directly (smolbox.serve.engine sets pixel_dtype from the graph)."""
    pre, _ = pair
    text = pre.render_chat([user(None, "What is it?")])
    for mode in MODES:
        image = make_image(70, 45, mode)
        pre.pixel_dtype = np.float32
        full = pre.encode(text, [image])
        pre.pixel_dtype = np.float16
        half = pre.encode(text, [image])
        assert half.pixel_values.dtype == np.float16, mode
        np.testing.assert_array_equal(half.pixel_values, full.pixel_values.astype(np.float16), err_msg=mode)
        np.testing.assert_array_equal(half.pixel_attention_mask, full.pixel_attention_mask)
    pre.pixel_dtype = np.float32


def test_small_images_are_upscaled(pair):
    """As in the processor, an image below the longest edge is resized up to it, then split into tiles."""
    pre, hf = pair
    image = make_image(5, 3, "RGB")
    tiles, rows, cols = pre.image_tiles(image)
    assert cols == pre.image_config["size"]["longest_edge"] // pre.image_config["max_image_size"]["longest_edge"]
    assert rows > 0 and len(tiles) == rows * cols + 1
    assert_same(pre.encode("<image>", [image]), hf(text=["<image>"], images=[[image]], return_tensors="np"))


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prompts_with_images_match(pair, n_images):
    pre, hf = pair
    images = [make_image(300, 200, "RGB", 1), make_image(40, 90, "RGBA", 2)][:n_images]
    messages = [user(*[None] * n_images, "Describe the images."), {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                user("And the color?")]
    text = pre.render_chat(messages)
    theirs = hf(text=[text], images=[images] if images else None, return_tensors="np")
    assert_same(pre.encode(text, images), theirs)
    if n_images:  # the grid of one image: <row_i_col_j> and <global-img> present, <image> ids where they belong
        ids = pre.encode(text, images).input_ids[0]
        assert (ids == pre.image_token_id).sum() == (theirs["input_ids"][0] == hf.image_token_id).sum()


MESSAGES = [
    [user("Hello")],
    [user(None, "What color is the square?")],
    [user("Compare", None, "and", None)],
    [user(None, "Hi"), {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}, user("Bye")],
    [{"role": "user", "content": "plain string content"}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "hi", "name": None}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}, {"type": "text", "text": "What?"}]}],
    [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "x"}]}],
]


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches(tiny_folder, messages, add_generation_prompt):
    hf = AutoProcessor.from_pretrained(tiny_folder)
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert Preprocessor(tiny_folder).render_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_batch_padding_matches(pair):
    pre, hf = pair
    rows = [
        ([make_image(64, 64, "RGB", 3)], [user(None, "Short?")]),
        ([make_image(1000, 1500, "RGB", 4), make_image(1, 1, "L", 5)], [user(None, "Compare with", None, "please, in detail.")]),
        ([make_image(2000, 100, "RGBA", 6)], [user("First", None), {"role": "assistant", "content": "x"}, user("more")]),
    ]
    for batch in (rows[:2], rows):
        texts = [pre.render_chat(messages) for _, messages in batch]
        images = [imgs for imgs, _ in batch]
        theirs = hf(text=texts, images=images, padding=True, padding_side="left", return_tensors="np")
        ours = pad_batch([pre.encode(t, i) for t, i in zip(texts, images)], pre.pad_token_id)
        assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
        assert_same(ours, theirs)


def test_batch_rows_without_images_get_zero_images(pair):
    pre, _ = pair
    with_image = pre.encode(pre.render_chat([user(None, "What?")]), [make_image(512, 384, "RGB")])
    text_only = pre.encode(pre.render_chat([user("A much longer question without any image at all, really.")]), [])
    batch = pad_batch([with_image, text_only], pre.pad_token_id)
    length = max(with_image.input_ids.shape[1], text_only.input_ids.shape[1])
    assert batch["input_ids"].shape == (2, length)
    short = 0 if with_image.input_ids.shape[1] < length else 1
    pad = length - [with_image, text_only][short].input_ids.shape[1]
    assert (batch["input_ids"][short, :pad] == pre.pad_token_id).all() and (batch["attention_mask"][short, :pad] == 0).all()
    np.testing.assert_array_equal(batch["pixel_values"][0], with_image.pixel_values[0])
    assert not batch["pixel_values"][1].any() and not batch["pixel_attention_mask"][1].any()

    text_batch = pad_batch([text_only, text_only], pre.pad_token_id)
    assert set(text_batch) == {"input_ids", "attention_mask"}


def test_decode_and_ids_match(pair):
    pre, hf = pair
    text = pre.render_chat([user(None, "The circle is red.")]) + " The square is blue.<end_of_utterance>"
    ids = pre.encode(text, [make_image(65, 33, "RGB")]).input_ids
    for skip in (True, False):
        assert pre.decode(ids, skip_special_tokens=skip) == hf.tokenizer.decode(ids[0], skip_special_tokens=skip)
    assert pre.decode(ids[0, -6:]) == hf.tokenizer.decode(list(ids[0, -6:]), skip_special_tokens=True)
    assert pre.image_token_id == hf.image_token_id
    assert pre.pad_token_id == hf.tokenizer.pad_token_id
    assert pre.eos_token_ids == {hf.tokenizer.eos_token_id}


def test_add_bos_token_in_the_config_is_ignored_like_transformers_does(tiny_folder, tmp_path):
    """With a tokenizer.json, transformers drops add_bos_token from tokenizer_config.json: no BOS is added."""
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "bos"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    pre, hf = Preprocessor(folder), AutoProcessor.from_pretrained(folder)
    text = "Describe<image>the image."
    image = make_image(64, 64, "RGB")
    ours = pre.encode(text, [image])
    assert_same(ours, hf(text=[text], images=[[image]], return_tensors="np"))
    assert hf.tokenizer.bos_token_id not in ours.input_ids


def test_special_tokens_missing_from_tokenizer_json_are_added(tiny_folder, tmp_path):
    """The processor makes <image> and <end_of_utterance> special tokens even when tokenizer.json does not list them."""
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "bare"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] not in ("<image>", "<end_of_utterance>")]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    pre, hf = Preprocessor(folder), AutoProcessor.from_pretrained(folder)
    text = pre.render_chat([user(None, "What?")])
    image = make_image(64, 64, "RGB")
    ours = pre.encode(text, [image])
    assert_same(ours, hf(text=[text], images=[[image]], return_tensors="np"))
    assert pre.decode(ours.input_ids) == hf.tokenizer.decode(ours.input_ids[0], skip_special_tokens=True)


def test_image_count_must_match_the_prompt(tiny_folder):
    pre = Preprocessor(tiny_folder)
    with pytest.raises(ValueError, match="1 <image> tokens but 0 images"):
        pre.encode("<image>what?", [])
    with pytest.raises(ValueError, match="0 <image> tokens but 1 images"):
        pre.encode("what?", [make_image(8, 8, "RGB")])


def test_works_without_torch_and_transformers(tiny_folder, tmp_path):
    image_path = tmp_path / "image.png"
    make_image(65, 33, "RGBA").save(image_path)
    text = "<|im_start|>User:<image>What?<end_of_utterance>\nAssistant:"
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch or transformers now raises ImportError
sys.modules["transformers"] = None
import numpy as np
from PIL import Image
from smolbox.preprocess import Preprocessor
e = Preprocessor({str(tiny_folder)!r}).encode({text!r}, [Image.open({str(image_path)!r})])
np.save({str(tmp_path / "pixels.npy")!r}, e.pixel_values)
print(e.input_ids[0].tolist())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = AutoProcessor.from_pretrained(tiny_folder)(text=[text], images=[[Image.open(image_path)]], return_tensors="np")
    assert json.loads(result.stdout) == theirs["input_ids"][0].tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "pixels.npy"), theirs["pixel_values"])


class CountingPreprocessor(Preprocessor):
    """Counts the images it really tiles."""

    tiled = 0

    def image_tiles(self, image):
        self.tiled += 1
        return super().image_tiles(image)


def test_a_tile_cache_tiles_a_repeated_image_once_with_the_same_inputs(real_folder):
    """With a tile cache (the server's serve.tile_cache_mb), an image sent again, as a new decoded copy, is not tiled
    again and gives the same ids, pixels and digest; another image, or the same one in another dtype, is a new entry."""
    from smolbox.serve.scheduler import LRUCache

    plain, cached = Preprocessor(real_folder), CountingPreprocessor(real_folder)
    cached.tile_cache = LRUCache(2**30)
    text = plain.render_chat([user(None, "What is it?")])
    first, again = (cached.encode(text, [make_image(512, 384, "RGB")]) for _ in range(2))
    expected = plain.encode(text, [make_image(512, 384, "RGB")])
    assert cached.tiled == 1 and len(cached.tile_cache) == 1
    for e in (first, again):
        np.testing.assert_array_equal(e.input_ids, expected.input_ids)
        np.testing.assert_array_equal(e.pixel_values, expected.pixel_values)
        assert e.image_digests == expected.image_digests and len(e.image_digests) == 1
    # The server's form (pad=False): no padded batch, the same tiles, shared with the cache rather than copied.
    unpadded = cached.encode(text, [make_image(512, 384, "RGB")], pad=False)
    assert unpadded.pixel_values is None and unpadded.pixel_attention_mask is None
    np.testing.assert_array_equal(unpadded.input_ids, expected.input_ids)
    assert unpadded.image_pixels[0] is first.image_pixels[0] and not unpadded.image_pixels[0].flags.writeable
    np.testing.assert_array_equal(unpadded.image_pixels[0], expected.pixel_values[0])
    cached.encode(text, [make_image(512, 384, "RGB", seed=1)])
    cached.pixel_dtype = np.float16
    assert cached.encode(text, [make_image(512, 384, "RGB")]).pixel_values.dtype == np.float16
    assert cached.tiled == 3 and len(cached.tile_cache) == 3
