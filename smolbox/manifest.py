"""Run manifests: one JSON file that says exactly what ran, written atomically so a crash never truncates it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    # mkstemp makes the file 0600; a manifest or eval.json is read by other users (a serving container's uid, a
    # colleague), as every other file of a run or an export folder is: the mode a plain open() gives.
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def image_labels() -> dict[str, str]:
    """Build facts baked into our container images as environment variables (empty outside them)."""
    keys = {"SMOLBOX_BASE_IMAGE": "base_image", "SMOLBOX_LOCK_SHA256": "lock_sha256", "SMOLBOX_GIT_COMMIT": "image_git_commit",
            "SMOLBOX_TORCH": "torch_variant", "SMOLBOX_ORT": "onnxruntime_variant", "SMOLBOX_FLASH_ATTN_WHEEL": "flash_attn_wheel"}
    return {name: os.environ[var] for var, name in keys.items() if os.environ.get(var)}
