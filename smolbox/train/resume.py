"""Whether and where a run resumes, from what its folder holds: the manifest's settings against the config's, and
the checkpoints that were fully written. Files and the config only (no torch), so the CLI refuses a run before the
stage's imports (plan.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import LENGTH_KEYS, Config, get_dotted
from ..manifest import read_json

COMPLETE_MARKER = "SMOLBOX_COMPLETE"  # written after a checkpoint is fully on disk


class RunError(RuntimeError):
    """A run that must not start (wrong folder, unusable checkpoint); the message says what to do."""


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that were fully written, oldest first (a SIGKILL mid-save leaves one without the marker)."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


@dataclass
class ResumePlan:
    checkpoint: str | None = None  # resume from this checkpoint
    finished: dict | None = None  # the manifest of a run that is already complete: nothing to do
    note: str | None = None  # what the log should say about it


def plan_resume(cfg: Config, run_dir: Path) -> ResumePlan:
    previous = read_json(run_dir / "manifest.json")
    if previous is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir} exists, is not empty and has no manifest.json: choose another run.name or empty it")
        return ResumePlan()
    then = previous.get("config", {})
    differing = [key for key, value in cfg.weight_settings().items() if get_dotted(then, key) != value]
    if differing:
        changes = "; ".join(f"{key} is {get_dotted(cfg.to_dict(), key)!r} now, {get_dotted(then, key)!r} there" for key in differing)
        raise RunError(f"{run_dir} was trained with other settings that shape the weights ({changes}); refusing to mix "
                       "runs. Set them back, choose another run.name, or delete that folder.")
    if cfg.run.resume == "never":
        raise RunError(f"{run_dir} already holds a run and run.resume=never: choose another run.name or set run.resume=auto")
    longer = {key: (get_dotted(then, key), get_dotted(cfg.to_dict(), key)) for key in LENGTH_KEYS
              if get_dotted(then, key) != get_dotted(cfg.to_dict(), key)}
    if cfg.run.resume == "auto":
        if previous.get("status") == "completed" and not longer and (run_dir / "adapter").is_dir():
            return ResumePlan(finished=previous)
        checkpoints = complete_checkpoints(run_dir)
        checkpoint = str(checkpoints[-1]) if checkpoints else None
    else:
        checkpoint = cfg.run.resume
        if not (Path(checkpoint) / COMPLETE_MARKER).is_file():
            raise RunError(f"run.resume={checkpoint} is not a complete checkpoint (no {COMPLETE_MARKER} in it)")
    note = None
    if longer and checkpoint:
        note = (f"continuing the run from {checkpoint} with a new length ("
                + "; ".join(f"{key} {old} -> {new}" for key, (old, new) in longer.items())
                + "): the learning-rate schedule now spans the new length")
    return ResumePlan(checkpoint, None, note)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: those steps are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
