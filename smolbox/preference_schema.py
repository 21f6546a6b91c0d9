"""Preference pairs as smolbox reads and writes them: the HuggingFaceH4/rlaif-v_formatted schema.

A row is `images` (a list of images), `prompt` (messages, with one image part per image), `chosen` and `rejected`
(one assistant message each); every message is {role, content: [{type, text}]}. smolbox's data loading checks rows
against it; the tiny bundle and the real-shape benchmark data are written in it.
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("images", "prompt", "chosen", "rejected")


def features(**extra):
    """The columns as datasets Features, with `extra` (name -> feature) after them."""
    import datasets

    message = {"role": datasets.Value("string"),
               "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}
    return datasets.Features({"images": datasets.List(datasets.Image()), **{name: datasets.List(message) for name in COLUMNS[1:]},
                              **extra})


def write_split(rows: list[dict], folder: Path, split: str) -> Path:
    """One split as a parquet file named like a hub data set's (<folder>/data/<split>-00000-of-00001.parquet), so
    load_dataset(folder) reads it."""
    import datasets

    path = Path(folder) / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features()).to_parquet(path)
    return path
