"""Eval stage: how a run and an export do on a held-out preference split, written as eval.json (+ eval.png).

A run (runs/<name>/eval.json): the trained adapter against its base, which is also the reference DPO trained
against (the same 4-bit weights with the adapters switched off):
  - DPO implicit reward of every pair, beta * (policy - reference) log-prob of chosen and of rejected: reward
    accuracy (chosen above rejected) and mean margin, for the adapter;
  - chosen-over-rejected log-prob win rate: how often the model itself gives the chosen answer the higher
    log-prob. This is the "before" number of the base model: its reward accuracy is degenerate (policy ==
    reference gives every reward 0, so no pair is ever right);
  - greedy answers to each prompt, scored against the chosen answer (exact after normalising case, spaces and a
    final full stop; word F1 for long answers) and how often they are the rejected answer.
An export (exports/<name>/eval.json): the same greedy scoring for every ONNX variant through ONNX Runtime (the
serving path: smolbox.preprocess + smolbox.runtime), and each variant's token agreement with fp32's greedy tokens.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .manifest import now, write_json_atomic

log = logging.getLogger("smolbox.eval")

BEFORE = ("the base model's chosen-over-rejected log-prob win rate: its DPO reward accuracy is degenerate (policy = "
          "reference gives every reward 0)")
EXAMPLES = 6  # question / chosen / answers kept in eval.json


class EvalError(ValueError):
    """Nothing to evaluate, or input that cannot be evaluated; the message says what to do."""


@dataclass
class EvalResult:
    kind: str  # "run" | "export"
    path: Path  # eval.json
    report: dict
    plot: Path | None

    def table(self) -> str:
        return run_table(self.report) if self.kind == "run" else export_table(self.report)


def evaluate(cfg: Config) -> list[EvalResult]:
    """Score the configured run and/or export (eval.run, eval.export) on the held-out split."""
    run_source, export_folder = _targets(cfg)
    rows, split = held_out_rows(cfg)
    results = []
    if run_source is not None:
        results.append(eval_run(cfg, run_source, rows, split))
    if export_folder is not None:
        results.append(eval_export(cfg, export_folder, rows, split))
    return results


# ---- what to evaluate ---------------------------------------------------------------------------------------


def _targets(cfg: Config):
    from .sources import SourceError, resolve_source

    e = cfg.eval
    run_source = export = None
    if e.run != "none":
        default_run = Path(cfg.run.output_dir) / cfg.run.name
        if e.run is not None or default_run.exists():
            try:
                run_source = resolve_source(cfg, e.run)
            except SourceError as exc:
                raise EvalError(f"eval.run: {exc}") from exc
    if e.export != "none":
        folder = Path(e.export) if e.export else cfg.export_dir()
        if e.export is not None and not folder.is_dir():
            raise EvalError(f"eval.export={e.export}: no such folder")
        if folder.is_dir():
            export = folder
    if run_source is None and export is None:
        raise EvalError(f"nothing to evaluate: no run at {Path(cfg.run.output_dir) / cfg.run.name} and no export at "
                        f"{cfg.export_dir()}; train or export first, or set eval.run / eval.export")
    return run_source, export


def held_out_rows(cfg: Config) -> tuple[list[dict], str]:
    """The first eval.max_samples cleaned rows of the held-out split (eval.split, else data.eval_split)."""
    from .train.data import DataError, load_preference_data

    split = cfg.eval.split or cfg.data.eval_split
    if not split:
        raise EvalError("no held-out split: set eval.split (or data.eval_split), e.g. test")
    try:
        loaded = load_preference_data(cfg.data, split)
    except (DataError, ValueError) as exc:  # datasets says ValueError for a split the data does not have
        raise EvalError(f"held-out split {split!r} of {cfg.data.id}: {exc}") from exc
    dataset = loaded.dataset
    if cfg.eval.max_samples:
        dataset = dataset.select(range(min(cfg.eval.max_samples, len(dataset))))
    return [dict(row) for row in dataset], loaded.source


# ---- scoring --------------------------------------------------------------------------------------------------


def message_text(messages: list[dict]) -> str:
    """The text of the last message (an rlaif-v chosen/rejected column: one assistant message)."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".!").strip()


def word_f1(prediction: str, reference: str) -> float:
    ours, theirs = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(ours) & Counter(theirs)).values())
    if not ours or not theirs or not common:
        return float(not ours and not theirs)
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


def score_answers(answers: list[str], rows: list[dict]) -> dict:
    """Greedy answers against each row's chosen (and rejected) answer."""
    chosen = [message_text(r["chosen"]) for r in rows]
    rejected = [message_text(r["rejected"]) for r in rows]
    exact = [normalize(a) == normalize(c) for a, c in zip(answers, chosen)]
    return {
        "exact": _mean(exact),
        "f1": _mean([word_f1(a, c) for a, c in zip(answers, chosen)]),
        "rejected": _mean([normalize(a) == normalize(r) for a, r in zip(answers, rejected)]),
        "right": exact,
    }


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else 0.0


def _question(row: dict) -> str:
    return message_text(row["prompt"])


def _examples(rows: list[dict], answers: dict[str, list[str]]) -> list[dict]:
    """A few rows with every side's answer, the ones where the sides disagree first."""
    order = sorted(range(len(rows)), key=lambda i: len({normalize(a[i]) for a in answers.values()}) == 1)
    return [{"question": _question(rows[i]), "chosen": message_text(rows[i]["chosen"]), "rejected": message_text(rows[i]["rejected"]),
             **{side: a[i] for side, a in answers.items()}} for i in order[:EXAMPLES]]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---- a run: base against adapter (PyTorch, the trained 4-bit path) ------------------------------------------


def eval_run(cfg: Config, source, rows: list[dict], split: str) -> EvalResult:
    import torch
    from peft import PeftModel

    from . import tiny
    from .env import resolve_attention, resolve_device
    from .models import load_processor, load_trained_base
    from .train import dpo

    started = time.perf_counter()
    device = resolve_device(cfg)
    attn, _ = resolve_attention(cfg, device)
    processor = load_processor(source.adapter_dir or tiny.resolve(source.model_id, "model"), cfg)
    model = load_trained_base(source, cfg, device, attn)
    if source.adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    model.eval()
    beta = _run_beta(cfg, source)
    log.info("eval: %s on %d held-out pairs of %s", source.adapter_dir or source.model_id, len(rows), split)

    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    collate = DataCollatorForVisionPreference(processor)
    policy, reference = [], []
    with torch.no_grad():
        for batch_rows in _batches(rows, cfg.eval.batch_size):
            batch = {k: v.to(model.device) for k, v in collate([dict(r) for r in batch_rows]).items()}
            reference.append(dpo.reference_logps(model, batch).float().cpu())
            if source.adapter_dir is not None:
                policy.append(dpo.completion_logps(model, batch).float().cpu())
    ref_chosen, ref_rejected = _pairs(reference)
    base = {"win_rate": _mean(ref_chosen > ref_rejected), "logp_chosen_mean": _mean(ref_chosen), "logp_rejected_mean": _mean(ref_rejected)}
    answers = {"base": _generate_torch(model, processor, rows, cfg, adapter=False)}
    base["greedy"] = score_answers(answers["base"], rows)
    report = {"kind": "run", "created": now(), "source": str(source.adapter_dir or source.model_id), "model_id": source.model_id,
              "split": split, "samples": len(rows), "beta": beta, "max_new_tokens": cfg.eval.max_new_tokens, "before": BEFORE,
              "base": base, "adapter": None}
    if source.adapter_dir is not None:
        chosen, rejected = _pairs(policy)
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        answers["adapter"] = _generate_torch(model, processor, rows, cfg, adapter=True)
        report["adapter"] = {
            "reward_accuracy": _mean(reward_chosen > reward_rejected),
            "reward_margin_mean": _mean(reward_chosen - reward_rejected),
            "reward_chosen_mean": _mean(reward_chosen), "reward_rejected_mean": _mean(reward_rejected),
            "win_rate": _mean(chosen > rejected), "logp_chosen_mean": _mean(chosen), "logp_rejected_mean": _mean(rejected),
            "greedy": score_answers(answers["adapter"], rows),
        }
    report["examples"] = _examples(rows, answers)
    report["seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(source.run_manifest).parent if source.run_manifest else (Path(source.adapter_dir) if source.adapter_dir else
                                                                               Path(cfg.run.output_dir) / cfg.run.name)
    name = "eval.json" if source.adapter_dir is not None else "eval-base.json"
    return _write(report, out_dir / name)


def _run_beta(cfg: Config, source) -> float:
    """The beta the run trained with (its rewards are scaled by it); the configured one otherwise."""
    from .manifest import read_json

    manifest = read_json(Path(source.run_manifest)) if source.run_manifest else None
    return float(manifest["config"]["train"]["beta"]) if manifest else cfg.train.beta


def _pairs(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """Per batch [chosen rows; rejected rows] log-probs -> (chosen, rejected) over all pairs."""
    chosen = np.concatenate([p.chunk(2)[0].numpy() for p in parts]) if parts else np.zeros(0)
    rejected = np.concatenate([p.chunk(2)[1].numpy() for p in parts]) if parts else np.zeros(0)
    return chosen, rejected


def _generate_torch(model, processor, rows: list[dict], cfg: Config, adapter: bool) -> list[str]:
    import contextlib

    disabled = contextlib.nullcontext() if adapter or not hasattr(model, "disable_adapter") else model.disable_adapter()
    with disabled:
        return generate_answers(model, processor, rows, cfg.eval.batch_size, cfg.eval.max_new_tokens)


def generate_answers(model, processor, rows: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers of a transformers model to each row's prompt, prompts left-padded in batches."""
    import torch

    answers = []
    with torch.no_grad():
        for batch_rows in _batches(rows, batch_size):
            texts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in batch_rows]
            images = [_images(r) for r in batch_rows]
            inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt").to(model.device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers += [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    return answers


def _images(row: dict) -> list:
    """A row's images as PIL images (cleaned rows hold them decoded; raw rlaif-v rows as {'bytes', 'path'})."""
    from PIL import Image

    return [Image.open(io.BytesIO(i["bytes"])).convert("RGB") if isinstance(i, dict) else i for i in row["images"]]


# ---- an export: every variant through ONNX Runtime ----------------------------------------------------------


def eval_export(cfg: Config, folder: Path, rows: list[dict], split: str) -> EvalResult:
    from .onnx_layout import available_variants
    from .preprocess import Preprocessor, pad_batch
    from .runtime import OnnxVLM, variant_providers

    started = time.perf_counter()
    present = available_variants(folder)
    if not present:
        raise EvalError(f"{folder}: no ONNX variant there (no complete onnx/vision_encoder, embed_tokens and "
                        "decoder_model_merged set); run smolbox export first, or set eval.export to an export folder")
    wanted = cfg.eval.variants or present
    missing = [v for v in wanted if v not in present]
    if missing:
        raise EvalError(f"{folder}: no {', '.join(missing)} variant (it has {', '.join(present)}); set eval.variants or export them")
    order = sorted(wanted, key=lambda v: v != "fp32")  # fp32 first: the others are compared with it
    preprocessor = Preprocessor(folder)
    texts = [preprocessor.render_chat(r["prompt"], add_generation_prompt=True) for r in rows]
    log.info("eval: %s, variants %s, on %d held-out questions of %s", folder, ", ".join(order), len(rows), split)
    report = {"kind": "export", "created": now(), "folder": str(folder), "split": split, "samples": len(rows),
              "max_new_tokens": cfg.eval.max_new_tokens, "reference_variant": "fp32" if "fp32" in order else None, "variants": {}}
    answers, tokens = {}, {}
    sizes = _weight_megabytes(folder)
    for variant in order:
        variant_started = time.perf_counter()
        runtime = OnnxVLM(folder, variant, providers=variant_providers(variant))
        preprocessor.pixel_dtype = runtime.pixel_dtype
        generated = []
        for batch_texts, batch_rows in zip(_batches(texts, cfg.eval.batch_size), _batches(rows, cfg.eval.batch_size)):
            encoded = [preprocessor.encode(t, _images(r)) for t, r in zip(batch_texts, batch_rows)]
            inputs = pad_batch(encoded, preprocessor.pad_token_id)
            out = runtime.generate(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                                   inputs.get("pixel_attention_mask"), cfg.eval.max_new_tokens)
            generated += [_until_eos(row, runtime.eos_token_ids) for row in out]
        tokens[variant] = generated
        answers[variant] = [preprocessor.decode(t).strip() for t in generated]
        entry = {"greedy": score_answers(answers[variant], rows), "provider": runtime.provider,
                 "seconds": round(time.perf_counter() - variant_started, 2), "weight_mb": sizes.get(variant)}
        if "fp32" in tokens:
            entry["token_agreement"] = token_agreement(tokens[variant], tokens["fp32"])
        report["variants"][variant] = entry
        log.info("eval: %-5s answers right %.1f%%, tokens equal to fp32's %s", variant, 100 * entry["greedy"]["exact"],
                 "n/a" if "token_agreement" not in entry else f"{100 * entry['token_agreement']:.1f}%")
    report["examples"] = _examples(rows, answers)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return _write(report, folder / "eval.json")


def _until_eos(tokens: np.ndarray, eos: set[int]) -> list[int]:
    out = []
    for token in tokens.tolist():
        out.append(token)
        if token in eos:
            break
    return out


def token_agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's greedy tokens (end of utterance included) that we produce at the same position."""
    matched = total = 0
    for a, b in zip(ours, reference):
        total += len(b)
        matched += sum(x == y for x, y in zip(a, b))
    return round(matched / total, 4) if total else 1.0


def _weight_megabytes(folder: Path) -> dict[str, float]:
    from .manifest import read_json

    manifest = read_json(folder / "manifest.json") or {}
    return {v: round(e["weight_bytes"] / 1e6, 3) for v, e in (manifest.get("variants") or {}).items() if "weight_bytes" in e}


# ---- output ---------------------------------------------------------------------------------------------------


def _write(report: dict, path: Path) -> EvalResult:
    from .plots import plot_eval

    path.parent.mkdir(parents=True, exist_ok=True)
    for side in ("base", "adapter"):
        if report.get(side):
            report[side]["greedy"].pop("right", None)
    for entry in report.get("variants", {}).values():
        entry["greedy"].pop("right", None)
    write_json_atomic(path, report)
    plot = plot_eval(report, path.with_suffix(".png"))
    return EvalResult(report["kind"], path, report, plot)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def run_table(report: dict) -> str:
    base, adapter = report["base"], report["adapter"] or {}
    lines = [["held-out pairs: " + f"{report['samples']} ({report['split']})", "base", "adapter"],
             ["answers right (greedy, exact)", _percent(base["greedy"]["exact"]), _percent(adapter.get("greedy", {}).get("exact"))],
             ["answer words right (greedy, F1)", _percent(base["greedy"]["f1"]), _percent(adapter.get("greedy", {}).get("f1"))],
             ["answers equal to the rejected one", _percent(base["greedy"]["rejected"]), _percent(adapter.get("greedy", {}).get("rejected"))],
             ["prefers chosen (log-prob win rate)", _percent(base["win_rate"]), _percent(adapter.get("win_rate"))],
             ["DPO reward accuracy", "n/a (= reference)", _percent(adapter.get("reward_accuracy"))],
             ["DPO reward margin (mean)", "0", "n/a" if not adapter else f"{adapter['reward_margin_mean']:.3f}"]]
    return _format(lines) + f"\n(before = {BEFORE})"


def export_table(report: dict) -> str:
    lines = [[f"held-out questions: {report['samples']} ({report['split']})", "answers right", "word F1", "tokens = fp32", "MB"]]
    for variant, entry in report["variants"].items():
        lines.append([variant, _percent(entry["greedy"]["exact"]), _percent(entry["greedy"]["f1"]),
                      _percent(entry.get("token_agreement")), "" if entry.get("weight_mb") is None else f"{entry['weight_mb']:g}"])
    return _format(lines)
