#!/usr/bin/env python3
"""Check the image locks (stdlib only, no network): every pin is exact and hashed, the CUDA and CPU variants of
each image pin the same versions, the serving locks carry no torch (nor matplotlib), and every lock agrees with requirements/dev.txt.
Run by scripts/lock after writing them and by scripts/ci-containers before building.

    check_locks.py                 check requirements/*.lock
    check_locks.py --fresh DIR     also compare with locks just made from pyproject.toml into DIR (LOCK_DIR=DIR
                                   scripts/lock): the same packages must appear. Versions may differ where nothing
                                   pins them (e.g. new NVIDIA wheels); a package added to or dropped from pyproject's
                                   extras without `just lock` shows up here."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REQ = Path(__file__).resolve().parent.parent / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
# Packages that only one variant of an image has: the CUDA runtime wheels, the GPU/CPU onnxruntime, torch's own.
VARIANT_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton|onnxruntime(-gpu)?)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: Path) -> tuple[dict[str, str], list[str]]:
    """{name: version} and the problems found (unhashed or inexact requirements)."""
    pins, problems = {}, []
    current = None
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            if current:
                pins[current[0]] = current[1]
                current = None
            continue
        if line.startswith("--"):  # --index-url / --extra-index-url / --find-links lines
            continue
        if current:
            problems.append(f"{path.name}: {current[0]} has no --hash")
        m = PIN.match(line)
        if not m:
            problems.append(f"{path.name}:{lineno}: not an exact pin: {line!r}")
            current = None
            continue
        current = (canonical(m.group(1)), m.group(3))
    if current:
        problems.append(f"{path.name}: {current[0]} has no --hash")
    return pins, problems


def base(version: str) -> str:
    return version.split("+")[0]


def main() -> int:
    locks = {name: REQ / f"{name}.lock" for name in ("train-cuda", "train-cpu", "serve-cuda", "serve-cpu")}
    missing = [str(p) for p in locks.values() if not p.is_file()]
    if missing:
        print(f"check_locks: missing {', '.join(missing)}: run `just lock`", file=sys.stderr)
        return 1
    pins, problems = {}, []
    for name, path in locks.items():
        pins[name], found = read(path)
        problems += found
    dev = {}
    for line in (REQ / "dev.txt").read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            dev[canonical(m.group(1))] = m.group(3)
    for a, b in (("train-cuda", "train-cpu"), ("serve-cuda", "serve-cpu")):
        for pkg in sorted(set(pins[a]) | set(pins[b])):
            if VARIANT_ONLY.match(pkg):
                continue
            va, vb = pins[a].get(pkg), pins[b].get(pkg)
            if va is None or vb is None or base(va) != base(vb):
                problems.append(f"{a}.lock has {pkg} {va}, {b}.lock has {vb}")
    for name in ("serve-cuda", "serve-cpu"):
        for training_only in ("torch", "matplotlib"):
            if training_only in pins[name]:
                problems.append(f"{name}.lock pins {training_only}: the serving image must not carry it")
    if base(pins["serve-cuda"].get("onnxruntime-gpu", "?")) != base(pins["serve-cpu"].get("onnxruntime", "!")):
        problems.append("serve-cuda.lock's onnxruntime-gpu and serve-cpu.lock's onnxruntime differ")
    for name, lock in pins.items():
        for pkg, version in lock.items():
            want = dev.get(pkg)
            if want is not None and base(want) != base(version):
                problems.append(f"{name}.lock has {pkg} {version}, requirements/dev.txt {want}")
    if len(sys.argv) == 3 and sys.argv[1] == "--fresh":
        for name, path in locks.items():
            fresh, _ = read(Path(sys.argv[2]) / path.name)
            added, dropped = sorted(set(fresh) - set(pins[name])), sorted(set(pins[name]) - set(fresh))
            if added or dropped:
                problems.append(f"{name}.lock is stale (run `just lock`): pyproject now adds {added}, drops {dropped}")
    for problem in problems:
        print(f"check_locks: {problem}", file=sys.stderr)
    if not problems:
        print("check_locks: " + ", ".join(f"{n}.lock {len(p)} pins" for n, p in pins.items()) + ": hashed, consistent")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
