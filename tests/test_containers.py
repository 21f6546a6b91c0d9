"""The container CI (scripts/ci-containers): both images built on a local Debian base, run and compared on CPU.

It needs root or a running docker engine and takes about 10 minutes, so it runs only where asked for:
CI=true (CI machines) or SMOLBOX_CONTAINER_TESTS=1. docs/containers.md lists what it checks.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "ci-containers"


def _wanted() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return os.environ.get("CI", "").strip().lower() in truthy or os.environ.get("SMOLBOX_CONTAINER_TESTS", "").strip().lower() in truthy


@pytest.mark.slow
@pytest.mark.skipif(not _wanted(), reason="container CI runs with CI=true or SMOLBOX_CONTAINER_TESTS=1 (needs docker or root, ~10 min)")
def test_container_images_build_run_and_match_in_process(tmp_path):
    log = tmp_path / "ci-containers.log"
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SMOLBOX_") and "__" in k)}  # config stays the script's
    with log.open("w") as out:
        proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=45 * 60)
    text = log.read_text()
    sys.stdout.write("".join(line for line in text.splitlines(keepends=True) if line.startswith("== ")))
    assert proc.returncode == 0, f"scripts/ci-containers exited {proc.returncode}:\n{text[-6000:]}"
    assert "ci-containers: PASSED" in text
