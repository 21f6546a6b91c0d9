"""The embedded tiny bundle knows its task: the pretrained model answers held-out questions, and its preference set
holds a flaw for DPO to fix, on pictures kept apart from everything trained on."""

import io
import json
from collections import defaultdict

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from smolbox import tiny
from smolbox.eval import generate_answers, message_text, score_answers


@pytest.fixture(scope="module")
def pretrained(tiny_bundle):
    model = AutoModelForImageTextToText.from_pretrained(tiny_bundle / "model", dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_bundle / "model")


def _kind(row: dict) -> str:
    question = message_text(row["prompt"])
    return next(kind for kind in tiny.KINDS if tiny.question(kind, "square").split()[:2] == question.split()[:2])


def test_pretrained_model_answers_held_out_color_and_shape_questions(pretrained, tiny_bundle):
    model, processor = pretrained
    rows = tiny.heldout_rows()
    assert len(rows) == tiny.HELDOUT_IMAGES * len(tiny.KINDS)
    answers = generate_answers(model, processor, rows, batch_size=32, max_new_tokens=10)
    right = score_answers(answers, rows)["right"]
    by_kind = defaultdict(list)
    for row, ok in zip(rows, right):
        by_kind[_kind(row)].append(ok)
    accuracy = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
    color_and_shape = by_kind["color"] + by_kind["shape"]
    assert sum(color_and_shape) / len(color_and_shape) >= 0.9, accuracy
    assert accuracy["describe"] >= 0.85, accuracy  # several tokens: "A green triangle."
    # What it gets wrong is mostly the flaw it was given: a pink shape called red.
    wrong = [(message_text(r["chosen"]), a) for r, a, ok in zip(rows, answers, right) if not ok]
    assert sum(" pink " in f" {chosen} " and " red " in f" {answer} " for chosen, answer in wrong) >= len(wrong) / 2, wrong
    report = json.loads((tiny_bundle / "pretrain.json").read_text())
    assert report["steps"] > 0 and report["heldout_teacher_forced_exact"]["shape"] >= 0.9


def test_preference_set_pairs_the_flaw_and_holds_out_its_test_split(tiny_bundle):
    seen = {s.key() for s in tiny.pretraining_scenes()}
    train, train_keys = tiny.preference_pairs(tiny.N_TRAIN, tiny.PREFERENCE_SEEDS["train"], exclude=seen)
    test, test_keys = tiny.preference_pairs(tiny.N_TEST, tiny.PREFERENCE_SEEDS["test"], exclude=seen | train_keys)
    assert not test_keys & (seen | train_keys) and not train_keys & seen
    assert len(test_keys) == tiny.N_TEST  # every held-out pair has its own picture
    for rows in (train, test):
        chosen = [message_text(r["chosen"]) for r in rows]
        rejected = [message_text(r["rejected"]) for r in rows]
        assert all(c != r for c, r in zip(chosen, rejected))
        fixes = sum(f" {tiny.RARE_COLOR} " in f" {c[:-1]} " and f" {tiny.RARE_MISTAKE} " in f" {r[:-1]} " for c, r in zip(chosen, rejected))
        assert fixes == len(rows) // 2  # half the pairs correct the flaw; the others keep "pink" off other colors
    # The bundle on disk holds exactly these rows: the held-out split is what eval scores.
    import datasets

    on_disk = datasets.load_dataset(str(tiny_bundle / "data"), split="test")
    assert [message_text(r["chosen"]) for r in on_disk] == [message_text(r["chosen"]) for r in test]
    assert on_disk[0]["images"][0].tobytes() == Image.open(io.BytesIO(test[0]["images"][0]["bytes"])).tobytes()


@pytest.mark.slow
def test_a_second_build_makes_the_same_bundle(tiny_bundle, tmp_path):
    """Deterministic: the same code on the same machine builds the same weights and data (a build pretrains for
    about a minute; the session's bundle may come from another process or an earlier session)."""
    again = tiny.ensure_bundle(tmp_path / "again")
    ours, theirs = load_file(again / "model" / "model.safetensors"), load_file(tiny_bundle / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for split in ("train", "test"):
        name = f"data/{split}-00000-of-00001.parquet"
        assert (again / "data" / name).read_bytes() == (tiny_bundle / "data" / name).read_bytes()
