"""The container CI (scripts/ci-containers): both images built on a local Debian base, run and compared on CPU.

It needs root or a running docker engine, may apt-install packages, start dockerd and build images, and takes
minutes, so it runs only when asked for: SMOLBOX_CONTAINER_TESTS=1 (.ci/run sets it). CI=true alone does not.
docs/containers.md lists what it checks, and how long it takes ("What CI checks").
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiers import CONTAINERS, wanted

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "ci-containers"


@pytest.mark.skipif(not wanted(CONTAINERS), reason="container checks run with SMOLBOX_CONTAINER_TESTS=1 (needs docker or root, ~10 min)")
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


@pytest.mark.parametrize("build_exit", [0, 1], ids=["built", "failed"])
def test_build_inputs_live_in_a_cache_and_leave_the_checkout_after_the_build(tmp_path, build_exit):
    """scripts/build-image links the CPU torch wheel (from its cache folder) and $PIP_CERT into the build context for
    the build only. `docker` here is a stand-in that records the context: the real builds are the container checks."""
    repo = tmp_path / "repo"
    for rel in ("scripts/build-image", "requirements/train-cpu.lock", "docker/train.Dockerfile",
                "docker/build-extra/README.md", "docker/build-extra/.gitignore"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes((REPO / rel).read_bytes())
    pin = next(line.split("==")[1].split()[0] for line in (REPO / "requirements/train-cpu.lock").read_text().splitlines()
               if line.startswith("torch=="))
    wheel = tmp_path / "cache" / "wheels" / f"torch-{pin}-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"a wheel")
    (tmp_path / "ca.pem").write_text("a CA bundle")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!/bin/sh\nfind docker/build-extra -type f | sort > {tmp_path}/context.txt\nexit {build_exit}\n")
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SMOLBOX_TORCH": "cpu", "BASE_IMAGE": "base:1",
           "SMOLBOX_BUILD_CACHE": str(tmp_path / "cache"), "PIP_CERT": str(tmp_path / "ca.pem"), "GIT_COMMIT": "abc"}
    result = subprocess.run(["bash", "scripts/build-image", "train"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == build_exit, result.stderr
    assert (tmp_path / "context.txt").read_text().split() == [
        "docker/build-extra/.gitignore", "docker/build-extra/README.md", "docker/build-extra/ca.crt", f"docker/build-extra/wheels/{wheel.name}"]
    left = sorted(str(p.relative_to(repo / "docker/build-extra")) for p in (repo / "docker/build-extra").rglob("*"))
    assert left == [".gitignore", "README.md"] and wheel.is_file()


def test_compose_needs_no_env_file():
    """Every ${VAR} in compose.yaml has a default and no service needs a .env: `docker compose run train` works on a
    fresh clone. Rendered by docker-compose 1.29 (what CI validates with) where it is installed."""
    import re
    import shutil
    import tempfile

    import yaml

    text = (REPO / "compose.yaml").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    without_default = [v for v in re.findall(r"\$\{([^}]*)\}", code) if ":-" not in v]
    assert without_default == []
    services = yaml.safe_load(text)["services"]
    for name, service in services.items():
        assert "env_file" not in service, name
        assert service["environment"]["SMOLBOX_ENV_FILE"] == "/opt/smolbox/project/.env", name
        assert "./:/opt/smolbox/project:ro" in service["volumes"], name
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (1.29) is not installed here: the YAML checks above ran, the rendering did not")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(REPO / "compose.yaml", folder)
        clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
        rendered = subprocess.run(["docker-compose", "config"], cwd=folder, env=clean, capture_output=True, text=True)
        assert rendered.returncode == 0, rendered.stderr
    resolved = yaml.safe_load(rendered.stdout)["services"]
    assert sorted(resolved) == ["eval", "export", "serve", "train", "verify"]
    assert resolved["train"]["image"] == "smolbox-train:latest" and resolved["train"]["user"] == "1000:1000"
    assert resolved["train"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
