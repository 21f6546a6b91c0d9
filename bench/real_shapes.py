"""A SmolVLM-Instruct-shaped model with random weights, its processor and a 512x384 image preference set, built
offline and deterministically, so GPU timings are honest without downloading anything.

    python -m bench.real_shapes --out /tmp/realshape [--scale real|small] [--train-rows 128] [--device cuda]

Writes <out>/model (save_pretrained, bf16 safetensors, with the processor) and <out>/data (parquet files named
like a hub data set, the HuggingFaceH4/rlaif-v_formatted schema), so configs can point model.id / data.id there.
Shapes (--scale real) are SmolVLM-Instruct's: Llama text model hidden 2048, 24 layers, 32 heads / 32 KV heads,
head_dim 64, intermediate 8192, vocab 49155, rope_theta 273768, untied head; SigLIP vision hidden 1152, 27 layers,
16 heads, intermediate 4304, patch 14, image 384; scale_factor 3 (81 tokens per tile); processor longest_edge 1536
with 384-px tiles. A 512x384 image becomes 4x3 tiles + the global image = 13 tiles, ~1,215 tokens per sequence.
--scale small keeps every code path and shrinks the widths and depths (CPU smoke tests).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
import time
from pathlib import Path

from smolbox import tiny

REAL = {
    "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
               "image_size": 384, "patch_size": 14},
    "text": {"vocab_size": 49155, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64},
    "scale_factor": 3, "longest_edge": 1536,
}
# Same processor geometry as REAL (so the same token counts); narrow, shallow layers.
SMALL = {
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 384, "patch_size": 14},
    "text": {"vocab_size": 49155, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16},
    "scale_factor": 3, "longest_edge": 1536,
}
SCALES = {"real": REAL, "small": SMALL}
IMAGE_SIZE = (512, 384)
# rlaif-v answers run to a few sentences; ~100 tokens per completion gives SmolVLM's ~1,215-token sequences.
COMPLETION_WORDS = 45


def image_seq_len(shape: dict) -> int:
    v = shape["vision"]
    return (v["image_size"] // v["patch_size"]) ** 2 // shape["scale_factor"] ** 2


def build_processor(shape: dict):
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": shape["longest_edge"]},
        max_image_size={"longest_edge": shape["vision"]["image_size"]},
        do_image_splitting=True, do_pad=True, resample=Image.Resampling.LANCZOS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tiny.build_tokenizer(),
                             image_seq_len=image_seq_len(shape), chat_template=tiny.CHAT_TEMPLATE)


def build_model(shape: dict, device: str = "cpu", seed: int = 0):
    """Random weights (transformers' own init), made in bf16 directly on `device`."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tokenizer = tiny.build_tokenizer()
    config = Idefics3Config(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=shape["scale_factor"],
        tie_word_embeddings=False,
        vision_config={**shape["vision"], "num_channels": 3, "layer_norm_eps": 1e-6},
        text_config={
            "model_type": "llama", **shape["text"], "max_position_embeddings": 16384, "rope_theta": 273768.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
    )
    torch.manual_seed(seed)
    if device == "cuda":
        torch.cuda.manual_seed_all(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Idefics3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = "bfloat16"
    # Random weights pick any of 49,155 ids, most of which the bench tokenizer (a few hundred tokens) cannot
    # decode, and stop at random. Zero the head rows of undecodable ids and of end-of-utterance: greedy text is
    # then decodable and always runs to max_tokens, which serving benchmarks need. Training cost is unchanged.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[len(tokenizer):] = 0
        head[tokenizer.eos_token_id] = 0
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    out = []
    while len(out) < n:
        out += [rng.choice(words) for _ in range(rng.randint(6, 12))]
        out[-1] += "."
    return " ".join(out[:n]).capitalize() + "."


def preference_rows(n: int, seed: int, size: tuple[int, int] = IMAGE_SIZE, completion_words: int = COMPLETION_WORDS) -> list[dict]:
    """tiny.preference_rows' schema and drawings, with 512x384 images and rlaif-v-length answers."""
    rng = random.Random(seed)
    names = list(tiny.COLORS)
    vocab = [w for line in tiny._corpus()[:40] for w in re.findall(r"[a-z]+", line.lower())]  # the chat's words too
    rows = []
    for _ in range(n):
        shape, color = rng.choice(tiny.SHAPES), rng.choice(names)
        wrong = rng.choice([c for c in names if c != color])
        buf = io.BytesIO()
        tiny.draw(shape, tiny.COLORS[color], size, rng).save(buf, format="PNG")
        tail = _sentence(rng, vocab, completion_words)
        rows.append({
            "images": [{"bytes": buf.getvalue(), "path": None}],
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                    {"type": "text", "text": f"Describe the {shape} in this picture in detail."}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"The {shape} is {color}. {tail}"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"The {shape} is {wrong}. {_sentence(rng, vocab, completion_words)}"}]}],
        })
    return rows


def write_preference_set(folder: Path, train_rows: int, test_rows: int) -> None:
    from smolbox.preference_schema import write_split

    for split, n, seed in (("train", train_rows, 11), ("test", test_rows, 12)):
        write_split(preference_rows(n, seed), folder, split)


def sequence_lengths(processor, rows: list[dict]) -> list[int]:
    """Tokens of prompt + chosen for each row, as TRL's collator builds them."""
    from PIL import Image

    lengths = []
    for row in rows:
        images = [Image.open(io.BytesIO(i["bytes"])).convert("RGB") for i in row["images"]]
        text = processor.apply_chat_template(row["prompt"] + row["chosen"])
        lengths.append(int(processor(text=[text], images=[images], return_tensors="pt")["input_ids"].shape[1]))
    return lengths


def build(out: Path, scale: str = "real", device: str = "cpu", train_rows: int = 128, test_rows: int = 8) -> dict:
    shape = SCALES[scale]
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    processor = build_processor(shape)
    processor.save_pretrained(tmp / "model")
    model = build_model(shape, device)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp / "model")
    del model
    write_preference_set(tmp / "data", train_rows, test_rows)
    lengths = sequence_lengths(processor, preference_rows(4, 11))
    facts = {"scale": scale, "parameters": params, "image_size": list(IMAGE_SIZE), "image_seq_len": image_seq_len(shape),
             "train_rows": train_rows, "test_rows": test_rows, "tokens_per_sequence": lengths,
             "build_s": round(time.perf_counter() - started, 1)}
    (tmp / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", choices=sorted(SCALES), default="real")
    parser.add_argument("--device", default=None, help="where to initialise the weights (default: cuda when available)")
    parser.add_argument("--train-rows", type=int, default=128)
    parser.add_argument("--test-rows", type=int, default=8)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(build(args.out, args.scale, device, args.train_rows, args.test_rows)))


if __name__ == "__main__":
    main()
