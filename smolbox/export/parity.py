"""Parity of every ONNX variant with the merged PyTorch model, on fixed image prompts: logit differences at prefill
and at one cached decode step, and greedy agreement. fp32 beyond its bound is a bug and fails the export."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import tiny
from ..config import Config
from ..runtime import OnnxVLM, variant_providers
from .errors import ExportError

log = logging.getLogger("smolbox.export")

PARITY_SEED = 1234


def parity_inputs(processor, count: int) -> list[dict]:
    """Fixed image prompts (drawn shapes, as in the tiny preference set), processed one per batch."""
    rows = tiny.preference_rows(count, seed=PARITY_SEED)
    batches = []
    for row in rows:
        images = [Image.open(io.BytesIO(img["bytes"])).convert("RGB") for img in row["images"]]
        text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True)
        batches.append(processor(text=[text], images=[images], return_tensors="pt"))
    return batches


def check_parity(model, processor, folder: Path, cfg: Config, device: str = "cpu") -> dict:
    """Per variant, against the merged PyTorch model: logit differences at prefill and at one cached decode step,
    and greedy agreement over parity_new_tokens.

    On a GPU machine the fp32 reference runs on the GPU (TF32 off) and the ONNX variants on onnxruntime's CUDA
    provider when it is installed (fp32 with TF32 off; int8 has no CUDA kernels and stays on the CPU): a
    full-size model's parity then takes seconds instead of many CPU minutes.
    """
    e = cfg.export
    on_gpu = device == "cuda" and torch.cuda.is_available()
    if on_gpu:
        model = model.to("cuda")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    references = []
    try:
        with torch.no_grad():
            for inputs in parity_inputs(processor, e.parity_prompts):
                inputs = inputs.to(model.device)
                prefill = model(**inputs).logits[:, -1].float().cpu().numpy()
                generated = model.generate(**inputs, max_new_tokens=e.parity_new_tokens, do_sample=False)
                new_tokens = generated[:, inputs["input_ids"].shape[1]:].cpu().numpy()
                extended = {**inputs, "input_ids": generated[:, : inputs["input_ids"].shape[1] + 1],
                            "attention_mask": torch.ones_like(generated[:, : inputs["input_ids"].shape[1] + 1])}
                decode = model(**extended).logits[:, -1].float().cpu().numpy()
                references.append(({k: v.cpu() for k, v in inputs.items()}, prefill, decode, new_tokens))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    report = {"prompts": e.parity_prompts, "new_tokens": e.parity_new_tokens,
              "reference": f"merged PyTorch model, fp32, {'CUDA' if on_gpu else 'CPU'}", "variants": {}}
    for variant in e.variants:
        providers = variant_providers(variant, {"use_tf32": 0}) if on_gpu else ["CPUExecutionProvider"]
        runtime = OnnxVLM(folder, variant, providers=providers)
        prefill_diff = decode_diff = 0.0
        matches = total = 0
        for inputs, prefill, decode, new_tokens in references:
            arrays = {k: v.numpy() for k, v in inputs.items()}
            step = runtime.prefill(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["pixel_attention_mask"])
            prefill_diff = max(prefill_diff, float(np.abs(step.logits - prefill).max()))
            step = runtime.decode(step, new_tokens[:, 0])  # feed the reference's first token to both
            decode_diff = max(decode_diff, float(np.abs(step.logits - decode).max()))
            ours = runtime.generate(arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"], arrays["pixel_attention_mask"], e.parity_new_tokens)
            n = min(ours.shape[1], new_tokens.shape[1])
            matches += int((ours[:, :n] == new_tokens[:, :n]).sum())
            total += new_tokens.shape[1]
        agreement = matches / total
        entry = {"max_logit_diff_prefill": prefill_diff, "max_logit_diff_decode": decode_diff, "greedy_agreement": agreement,
                 "provider": runtime.provider}
        if variant == "fp32":
            entry["ok"] = max(prefill_diff, decode_diff) <= e.fp32_max_logit_diff and agreement == 1.0
            if not entry["ok"]:
                raise ExportError(f"fp32 ONNX parity broken (logit diff {max(prefill_diff, decode_diff):.3g}, greedy agreement "
                                  f"{agreement:.2f}): this is a bug in the exporter, please report it")
        else:
            entry["ok"] = max(prefill_diff, decode_diff) <= e.quantized_max_logit_diff and agreement >= e.quantized_min_agreement
            if not entry["ok"]:
                log.warning("!!! export: %s parity beyond thresholds: logit diff %.3g (max %.3g), greedy agreement %.2f "
                            "(min %.2f); it is marked in manifest.json", variant, max(prefill_diff, decode_diff),
                            e.quantized_max_logit_diff, agreement, e.quantized_min_agreement)
        report["variants"][variant] = entry
        log.info("export: parity %-5s prefill %.3g decode %.3g agreement %.2f %s", variant, prefill_diff, decode_diff,
                 agreement, "ok" if entry["ok"] else "FLAGGED")
    return report
