"""Request preprocessing on the CPU at SmolVLM-Instruct's image settings (1536-px images in 384-px tiles): what a
512x384 image request costs the server before it reaches the engine's queue, with and without the tile cache
(serve.tile_cache_mb) holding the image, with and without the padded pixel batch (Preprocessor.encode's pad, which
the server leaves out), and the image-key step (scheduler.image_parts).

    python -m bench.preprocess_bench [--repeats 10] [--json docs/results/<date>-<card>/preprocess.json]

Needs transformers (to write the processor files of the real settings on the tiny tokenizer), not a model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.serve_bench import median_ms


def real_settings_folder(root: Path) -> Path:
    """Processor files with SmolVLM-Instruct's image settings on the tiny tokenizer (as tests/test_preprocess.py)."""
    from transformers import GenerationConfig, Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    from smolbox import tiny
    from smolbox.export.folder import save_processor_files

    image_processor = Idefics3ImageProcessorPil(do_resize=True, size={"longest_edge": 1536}, max_image_size={"longest_edge": 384},
                                                do_image_splitting=True, do_pad=True)
    tokenizer = tiny.build_tokenizer()
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=81, chat_template=tiny.CHAT_TEMPLATE)
    save_processor_files(processor, root)
    Idefics3Config(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=3,
                   vision_config={"patch_size": 14, "image_size": 384}).save_pretrained(root)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from smolbox.preprocess import Preprocessor
    from smolbox.serve.scheduler import LRUCache, image_parts

    pre = Preprocessor(real_settings_folder(Path(tempfile.mkdtemp(prefix="preprocess-bench-"))))
    pre.pixel_dtype = np.float16  # what the q4f16 vision graph takes
    text = pre.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}])
    image = lambda: Image.new("RGB", (512, 384), (180, 60, 40))  # noqa: E731 - a new decoded copy per request, as the server has
    encoded = pre.encode(text, [image()], pad=False)
    row = {"image": "512x384", "tiles": sum(map(len, encoded.image_pixels)), "prompt_tokens": int(encoded.input_ids.shape[1]),
           "encode_ms": median_ms(lambda: pre.encode(text, [image()], pad=False), args.repeats),
           "image_parts_ms": median_ms(lambda: image_parts(encoded, b"export"), args.repeats)}
    pre.tile_cache = LRUCache(2**30)
    pre.encode(text, [image()])
    # The server's form (pad=False) against the padded pixel batch it built before lease 12 on a tile-cache hit.
    row["encode_tile_cache_hit_ms"] = median_ms(lambda: pre.encode(text, [image()], pad=False), args.repeats)
    row["encode_tile_cache_hit_padded_ms"] = median_ms(lambda: pre.encode(text, [image()]), args.repeats)
    print(f"{'image':>8} {'tiles':>5} {'encode ms':>9} {'cached ms':>9} {'cached+padded ms':>16} {'image_parts ms':>14}")
    print(f"{row['image']:>8} {row['tiles']:>5} {row['encode_ms']:>9} {row['encode_tile_cache_hit_ms']:>9} "
          f"{row['encode_tile_cache_hit_padded_ms']:>16} {row['image_parts_ms']:>14}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
