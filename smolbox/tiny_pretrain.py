"""Pretraining of the tiny bundle's model on smolbox.tiny's synthetic task: deterministic, offline, CPU.

Next-token training on (image, question, answer) triples, each formatted exactly as TRL formats a DPO pair's prompt
and chosen completion, so what the model learns here is what DPO and `smolbox eval` score. Every step encodes each
of its images once and asks all three questions about it (the text rows share the image features). A linear
read-out of the pooled image features (shape and color) adds a direct signal for the vision tower and is thrown
away afterwards: through the text alone the tower learned circle against square several times slower
(docs/eval.md, "What did not work").

One intra-op thread: the ops of a 64-wide model gain nothing from more, a shared machine loses a lot to contending
threads, and one thread gives the same bits on every run of a machine.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
import torch.nn.functional as F

from . import tiny

log = logging.getLogger("smolbox.tiny")

SEED = 11
STEPS = 250
IMAGES_PER_STEP = 16
LEARNING_RATE = 5e-3
WARMUP_STEPS = 20
MIN_LR_FRACTION = 0.05  # cosine decay floor
AUX_WEIGHT = 2.0


class _Encoder:
    """Token ids and pixels of (scene, kind) examples, with the image processed once per scene."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._prompts: dict[tuple, list[int]] = {}
        self._completions: dict[str, list[int]] = {}

    def pixels(self, scene: tiny.Scene) -> dict:
        out = self.processor.image_processor([[scene.image]], return_tensors="pt", return_row_col_info=True)
        return {"pixel_values": out["pixel_values"][0], "pixel_attention_mask": out["pixel_attention_mask"][0],
                "grid": (out["rows"][0][0], out["cols"][0][0])}

    def ids(self, scene: tiny.Scene, grid: tuple[int, int], kind: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) as TRL's vision collator builds them."""
        prompt_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": tiny.question(kind, scene.shape)}]}]
        key = (prompt_messages[0]["content"][1]["text"], grid)
        if key not in self._prompts:  # the expanded image tokens depend only on the tile grid
            text = self.processor.apply_chat_template(prompt_messages, add_generation_prompt=True)
            self._prompts[key] = self.processor(text=[text], images=[[scene.image]], add_special_tokens=False)["input_ids"][0]
        completion = completion_text(self.processor, prompt_messages, tiny.answer(kind, scene.shape, scene.label or scene.color))
        if completion not in self._completions:
            self._completions[completion] = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return self._prompts[key], self._completions[completion]


def completion_text(processor, prompt_messages: list[dict], answer: str) -> str:
    """The completion string TRL's apply_chat_template cuts from prompt + answer (e.g. " The square is red.<eou>\\n")."""
    prompt = processor.apply_chat_template(prompt_messages, add_generation_prompt=True)
    full = processor.apply_chat_template([*prompt_messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    if not full.startswith(prompt):
        raise ValueError(f"the chat template does not extend the prompt: {prompt!r} / {full!r}")
    return full[len(prompt):]


def _step_loss(model, heads, batch: list[tuple[tiny.Scene, dict]], encoder: _Encoder, pad_id: int):
    """Answer-token cross-entropy (+ the auxiliary read-out's) of every scene in `batch` with every question kind;
    also, per row, whether every answer token is the arg-max (teacher-forced exact answer)."""
    pixel_values = torch.stack([p["pixel_values"] for _, p in batch])
    pixel_mask = torch.stack([p["pixel_attention_mask"] for _, p in batch])
    features = model.model.get_image_features(pixel_values, pixel_mask).pooler_output  # per scene [tokens, hidden]
    rows, row_features = [], []
    for (scene, pixels), feats in zip(batch, features):
        for kind in tiny.KINDS:
            rows.append(encoder.ids(scene, pixels["grid"], kind))
            row_features.append(feats)
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, (prompt, completion) in enumerate(rows):  # right padding: positions match TRL's flushed-left rows
        n = len(prompt) + len(completion)
        ids[r, :n] = torch.tensor(prompt + completion)
        attention[r, :n] = 1
        labels[r, len(prompt):n] = torch.tensor(completion)
    hidden = model.model(input_ids=ids, attention_mask=attention, mm_encoder_outputs={"image": _Pooled(row_features)},
                         use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])  # the LM head on answer positions only
    loss = F.cross_entropy(logits, targets[scored])
    correct = torch.ones_like(targets, dtype=torch.bool)
    correct[scored] = logits.argmax(-1) == targets[scored]
    exact = correct.all(1).view(len(batch), len(tiny.KINDS))
    if heads is not None:
        pooled = torch.stack([torch.cat([f.mean(0), f.amax(0)]) for f in features])
        shapes = torch.tensor([tiny.SHAPES.index(s.shape) for s, _ in batch])
        colors = torch.tensor([list(tiny.COLORS).index(s.color) for s, _ in batch])  # what is drawn, not the label
        loss = loss + AUX_WEIGHT * (F.cross_entropy(heads[0](pooled), shapes) + F.cross_entropy(heads[1](pooled), colors))
    return loss, exact


class _Pooled:
    """What Idefics3Model takes as precomputed image features: an object with `pooler_output`."""

    def __init__(self, features: list[torch.Tensor]):
        self.pooler_output = features


def pretrain(model, processor, train_scenes: list[tiny.Scene], heldout_scenes: list[tiny.Scene]) -> dict:
    """Train `model` in place; returns a report (steps, seconds, losses, teacher-forced held-out accuracy)."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return _pretrain(model, processor, train_scenes, heldout_scenes, started)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model, processor, train_scenes, heldout_scenes, started: float) -> dict:
    encoder = _Encoder(processor)
    pad_id = processor.tokenizer.pad_token_id
    data = [(scene, encoder.pixels(scene)) for scene in train_scenes]
    heldout = [(scene, encoder.pixels(scene)) for scene in heldout_scenes]
    hidden = model.config.text_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(2 * hidden, len(tiny.SHAPES)), torch.nn.Linear(2 * hidden, len(tiny.COLORS))])
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * max(
        MIN_LR_FRACTION, 0.5 * (1 + math.cos(math.pi * s / STEPS))))
    order = random.Random(SEED)
    model.train()
    losses = []
    for step in range(1, STEPS + 1):
        batch = [data[order.randrange(len(data))] for _ in range(IMAGES_PER_STEP)]
        loss, _ = _step_loss(model, heads, batch, encoder, pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if step % 50 == 0 or step == STEPS:
            log.info("tiny bundle: pretraining step %d/%d, loss %.4f, %.0f s", step, STEPS, loss.item(), time.perf_counter() - started)
    model.eval()
    with torch.no_grad():
        exact = torch.cat([_step_loss(model, None, heldout[i:i + 32], encoder, pad_id)[1] for i in range(0, len(heldout), 32)])
    accuracy = {kind: round(float(v), 4) for kind, v in zip(tiny.KINDS, exact.float().mean(0))}
    log.info("tiny bundle: pretrained in %.0f s; held-out answers right (teacher-forced): %s", time.perf_counter() - started, accuracy)
    return {"steps": STEPS, "images": len(train_scenes), "images_per_step": IMAGES_PER_STEP, "learning_rate": LEARNING_RATE,
            "seconds": round(time.perf_counter() - started, 1), "loss_every_10_steps": losses[::10] + losses[-1:],
            "heldout_images": len(heldout_scenes), "heldout_teacher_forced_exact": accuracy}
