"""scripts/setup's choices, from a real run of the script: where torch comes from (GPU or not, index reachable or
not) and that a second run installs nothing. Then scripts/test, as CI runs it.

The script runs in a copy of its inputs. Two outside programs are stand-ins: `nvidia-smi` (present, failing or
absent) and the venv's `python`, which records the pip commands it is given instead of installing gigabytes. The
package index is a real HTTP server on loopback (or a closed port, for an unreachable one).
"""

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCH = next(line.strip() for line in (REPO / "requirements" / "dev.txt").read_text().splitlines() if line.startswith("torch=="))
PIP = "-m pip install -q --disable-pip-version-check"
FETCH = "-m pip download -q --disable-pip-version-check --no-deps --dest WHEELS"  # WHEELS: the script's temporary folder
PIN = TORCH.split("==")[1]
WHEEL = f"torch-{PIN}-cp311-cp311-linux_x86_64.whl"
INSTALL_TORCH = f"{PIP} --no-deps WHEELS/{WHEEL}"  # pip installs it: the copy of the repo has no scripts/tools, so no uv


def script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    for rel in ("scripts/setup", "requirements/dev.txt", "pyproject.toml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    (root / ".venv" / "pyvenv.cfg").parent.mkdir()
    (root / ".venv" / "pyvenv.cfg").write_text("version = 3.11.7\n")
    # pip download leaves a wheel in --dest; NO_LOCAL_WHEEL=1: pip finds none on this machine
    script(root / ".venv" / "bin" / "python",
           'echo "$*" >> "$SETUP_LOG"\n'
           'case "$*" in *--no-index*) [ "${NO_LOCAL_WHEEL:-0}" = 0 ] || exit 1 ;; esac\n'
           f'case "$*" in *" download "*) while [ "$1" != --dest ]; do shift; done; touch "$2/{WHEEL}" ;; esac\n')
    script(root / ".venv" / "bin" / "smolbox", "exit 0\n")  # what `pip install -e .` would have made
    return root


@pytest.fixture(scope="module")
def index():
    """A package index on loopback that has a torch page."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/simple/torch/" else 404)
            self.end_headers()
            self.wfile.write(b"<a href='torch-x.whl'>torch</a>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/simple"


def run_setup(repo: Path, tmp_path: Path, gpu: str, *args, **env):
    """gpu: 'absent' (no nvidia-smi), 'broken' (nvidia-smi fails: no driver loaded) or 'present' (it lists one)."""
    fake_bin = tmp_path / f"bin-{gpu}"
    if gpu == "present":
        script(fake_bin / "nvidia-smi", 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0000)"\n')
    elif gpu == "broken":
        script(fake_bin / "nvidia-smi", 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."\nexit 9\n')
    fake_bin.mkdir(exist_ok=True)
    path = [str(fake_bin)] + [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "SMOLBOX_TORCH_CPU_INDEX")}
    environ.update(PATH=os.pathsep.join(path), PYTHON=sys.executable, SETUP_LOG=str(tmp_path / "pip.log"), **env)
    result = subprocess.run(["bash", "scripts/setup", *args], cwd=repo, env=environ, capture_output=True, text=True, timeout=120)
    log = tmp_path / "pip.log"
    calls = log.read_text().splitlines() if log.exists() else []
    wheels = next((c.split("--dest ", 1)[1].split()[0] for c in calls if "--dest " in c), None)
    if wheels:
        assert not Path(wheels).exists(), "the script left its download folder"
        calls = [c.replace(wheels, "WHEELS") for c in calls]
    log.unlink(missing_ok=True)
    return result, calls


@pytest.mark.parametrize("gpu", ["absent", "broken"])
def test_without_a_gpu_torch_comes_from_the_cpu_index_and_a_second_run_installs_nothing(repo, tmp_path, index, gpu):
    result, calls = run_setup(repo, tmp_path, gpu, SMOLBOX_TORCH_CPU_INDEX=index)
    assert result.returncode == 0, result.stderr
    assert calls == [f"{FETCH} --index-url {index} {TORCH}", INSTALL_TORCH, f"{PIP} -r requirements/dev.txt", f"{PIP} --no-deps -e ."]
    again, calls = run_setup(repo, tmp_path, gpu, SMOLBOX_TORCH_CPU_INDEX=index)
    assert again.returncode == 0 and calls == []
    assert run_setup(repo, tmp_path, gpu, "--check", SMOLBOX_TORCH_CPU_INDEX=index)[0].returncode == 0
    with (repo / "requirements" / "dev.txt").open("a") as f:
        f.write("# a changed pin\n")
    assert run_setup(repo, tmp_path, gpu, "--check", SMOLBOX_TORCH_CPU_INDEX=index)[0].returncode == 1
    assert len(run_setup(repo, tmp_path, gpu, SMOLBOX_TORCH_CPU_INDEX=index)[1]) == 4
    # torch at the pin is already there: a rerun leaves it
    (repo / ".venv" / "lib" / "python3.11" / "site-packages" / f"torch-{PIN}+cpu.dist-info").mkdir(parents=True)
    with (repo / "requirements" / "dev.txt").open("a") as f:
        f.write("# another changed pin\n")
    assert run_setup(repo, tmp_path, gpu, SMOLBOX_TORCH_CPU_INDEX=index)[1] == [f"{PIP} -r requirements/dev.txt", f"{PIP} --no-deps -e ."]


def test_with_a_gpu_torch_comes_from_pypi_and_a_gpu_appearing_means_a_new_run(repo, tmp_path, index):
    result, calls = run_setup(repo, tmp_path, "present", SMOLBOX_TORCH_CPU_INDEX=index)
    assert result.returncode == 0, result.stderr
    assert calls == [f"{PIP} -r requirements/dev.txt", f"{PIP} --no-deps -e ."]
    assert run_setup(repo, tmp_path, "absent", "--check", SMOLBOX_TORCH_CPU_INDEX=index)[0].returncode == 1
    # TORCH_INDEX_URL wins over the detection either way
    result, calls = run_setup(repo, tmp_path, "present", TORCH_INDEX_URL=index)
    assert calls[:2] == [f"{FETCH} --index-url {index} {TORCH}", INSTALL_TORCH]


def test_unreachable_cpu_index_uses_a_wheel_on_the_machine_or_says_what_to_set(repo, tmp_path):
    unreachable = closed_port_url()
    result, calls = run_setup(repo, tmp_path, "absent", SMOLBOX_TORCH_CPU_INDEX=unreachable)
    assert result.returncode == 0, result.stderr
    assert calls[:2] == [f"{FETCH} --no-index {TORCH}", INSTALL_TORCH] and len(calls) == 4
    assert f"{unreachable} is unreachable" in result.stderr and "from a wheel on this machine" in result.stderr
    (repo / ".venv" / ".smolbox-setup").unlink()
    result, calls = run_setup(repo, tmp_path, "absent", SMOLBOX_TORCH_CPU_INDEX=unreachable, NO_LOCAL_WHEEL="1")
    assert result.returncode == 1 and calls == [f"{FETCH} --no-index {TORCH}"]
    assert "no torch" in result.stderr and "Set TORCH_INDEX_URL" in result.stderr
    assert not (repo / ".venv" / ".smolbox-setup").exists()


# ---- scripts/test -----------------------------------------------------------------------------------------------


def leftovers() -> set[str]:
    """Untracked and ignored paths in the checkout (git's view), .venv aside."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and not line[3:].startswith(".venv/")}


@pytest.mark.slow  # a pytest session of its own, through scripts/test
def test_scripts_test_with_ci_true_runs_no_container_checks_and_leaves_nothing_behind(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    if subprocess.run(["bash", "scripts/setup", "--check"], cwd=REPO).returncode != 0:
        pytest.skip("this checkout's .venv is not up to date with scripts/setup (run it once): the test would install")
    before = leftovers()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("SMOLBOX_CONTAINER_TESTS", "SMOLBOX_CACHE", "HF_HOME", "PYTEST_DEBUG_TEMPROOT")}
    env.update(CI="true", TMPDIR=str(scratch))
    result = subprocess.run(["bash", "scripts/test", "-q", "-rs", "tests/test_containers.py", "tests/test_docs.py"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "SKIPPED" in result.stdout and "SMOLBOX_CONTAINER_TESTS=1" in result.stdout
    assert list(scratch.iterdir()) == []  # the suite's caches and tmp_path folders went with it
    assert leftovers() == before
