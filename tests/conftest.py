import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.tiers import SLOW, wanted

# What the suite writes goes into one temporary folder, removed when the session passes (kept for a look when it
# fails): the Hugging Face caches (datasets' arrow files and locks) and pytest's own tmp_path folders, so nothing
# stays in /tmp. The tiny bundle is the exception: it is built once per machine into the smolbox cache
# (SMOLBOX_CACHE, default ~/.cache/smolbox), in a folder named after its builder's code and library versions, so a
# changed builder builds afresh and a session never reuses a stale bundle. A build pretrains the model (about a
# minute on a CPU core); tests/test_tiny.py checks what a build makes, and that it makes the same bundle again.
# A caller may point SMOLBOX_CACHE or HF_HOME somewhere on purpose.
# scripts/test runs the suite on every core with pytest-xdist: its workers are processes this one starts; they
# inherit the environment below and share this session's folder (SMOLBOX_TEST_SCRATCH names it with the pid of
# the process that made it, so a pytest that a test starts, whose parent is not that process, makes its own).
_SHARED = os.environ.get("SMOLBOX_TEST_SCRATCH", "").partition(":")
_WORKER = "PYTEST_XDIST_WORKER" in os.environ and _SHARED[0] == str(os.getppid()) and bool(_SHARED[2])
SCRATCH = _SHARED[2] if _WORKER else tempfile.mkdtemp(prefix="smolbox-test-")
if not _WORKER:
    os.environ["SMOLBOX_TEST_SCRATCH"] = f"{os.getpid()}:{SCRATCH}"
_PASSED = pytest.StashKey[bool]()
os.environ.setdefault("HF_HOME", os.path.join(SCRATCH, "huggingface"))
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", SCRATCH)  # where pytest makes tmp_path folders (read lazily)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for torch here and in every process a test starts (read when torch is first imported): the
# tiny model's 64-wide ops gain nothing from more, contending threads on a shared machine cost several times the
# time (docs/notes.md), and the same thread count everywhere gives in-process and command-line runs the same bits.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# ---- pytest-xdist: which tests a worker takes together ------------------------------------------------------------
# Session fixtures are built once per worker, except the tiny bundle and the demo's tiny run, which the first worker
# to need them makes for all (a file lock; the others wait). The modules on serve's random export go to one worker
# as one unit, so it is built once; every other module is a unit of its own. The units start longest first (as
# `--durations=0` on 2 cores ranks them), so the longest is not left for the end: the container checks
# (SMOLBOX_CONTAINER_TESTS=1) before all, then the module that runs the demo, while the other worker starts on units
# that do not wait for it (the slow checks', the random export's, preprocessing's).
SHARED_UNITS = {"random-export": ("tests/serve/",)}
UNIT_FIXTURES = {"random-export": {"random_export"}}
LONGEST_FIRST = ["tests/test_containers.py", "tests/export/test_folder.py", "tests/train/test_distributed.py",
                 "random-export", "tests/train/test_compile.py", "tests/test_preprocess.py", "tests/train/test_stage.py",
                 "tests/export/test_graphs.py", "tests/test_tiny.py"]


def unit_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return next((unit for unit, prefixes in SHARED_UNITS.items() if module.startswith(prefixes)), module)


class _Units:
    """Registered only when pytest-xdist is there (its hook is unknown to pytest otherwise)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "load":  # an explicit --dist keeps its own meaning
            return None
        from xdist.scheduler import LoadScopeScheduling

        class ByUnit(LoadScopeScheduling):
            def _split_scope(self, nodeid):
                return unit_of(nodeid)

            def _reschedule(self, node):
                # The next unit goes to a worker when it has one test left, not xdist's two: a worker runs a test
                # once it knows the next one (pytest's nextitem), so one is the least that keeps it going. With two,
                # a worker whose last two tests were long (test_distributed's) took the next long unit
                # while the other worker was about to be free, and ran both units one after the other.
                if node.shutting_down:
                    return
                if not self.workqueue:
                    node.shutdown()
                elif self._pending_of(self.assigned_work[node]) <= 1:
                    self._assign_work_unit(node)

        config.option.loadscopereorder = False  # the order of the collection below, not the number of tests
        return ByUnit(config, log)


def pytest_collection_modifyitems(config, items):
    if not wanted(SLOW):
        skip = pytest.mark.skip(reason=f"a slow check: runs with {SLOW}=1, as in CI (tests/tiers.py)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    if not hasattr(config, "workerinput"):
        return
    for item in items:
        unit = unit_of(item.nodeid)
        for name, fixtures in UNIT_FIXTURES.items():
            if unit != name and fixtures & set(item.fixturenames):
                raise pytest.UsageError(f"{item.nodeid} uses {name}'s session fixtures: add its module to "
                                        f"SHARED_UNITS[{name!r}] in tests/conftest.py, or each worker builds them")
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_Units(), "smolbox-xdist-units")
    # pytest resets warning filters around each test: give it smolbox's (smolbox.quiet) as its own.
    from smolbox import quiet

    for line in quiet.pytest_filters():
        config.addinivalue_line("filterwarnings", line)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_PASSED] = exitstatus in (0, 5)  # passed, or nothing collected


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):  # after every fixture's teardown
    if _WORKER:  # the process that started the workers decides, after they have ended
        # and waits for them to end: as smolbox.cli.run does, leave the libraries' objects to the process's exit
        # rather than to Python's last collections, seconds a worker (docs/notes.md)
        import gc

        gc.freeze()
        return
    if config.stash.get(_PASSED, False):
        shutil.rmtree(SCRATCH, ignore_errors=True)
    else:
        print(f"\nsmolbox tests: kept {SCRATCH} (caches and tmp_path folders of a failed or interrupted session)")


def _one_worker_at_a_time(name: str):
    """A lock the session's workers share: under it the first makes what is missing, the others wait and find it."""
    from filelock import FileLock

    return FileLock(os.path.join(SCRATCH, f"{name}.lock"))


@pytest.fixture(scope="session")
def tiny_bundle():
    from smolbox import tiny

    with _one_worker_at_a_time("tiny-bundle"):
        return tiny.ensure_bundle()


# ---- one tiny run, trained and exported once (by the demo), for every module that needs one -------------------


@pytest.fixture(scope="session")
def tiny_demo(tiny_bundle):
    """`smolbox demo` run in a new folder: what it printed. The run and the export it leaves there (runs/tiny,
    exports/tiny) are the session's tiny run and export: they are not trained and exported twice. With the slow
    checks it runs as a user runs it, in a process of its own (whose output tests/test_cli.py also checks for
    progress bars and library warnings); without, the same command runs here, in a worker that has imported the
    libraries already. The first worker to need it runs it; the others wait for it and read what it printed."""
    import json
    import subprocess
    import sys

    folder, printed = Path(SCRATCH) / "tiny-demo", Path(SCRATCH) / "tiny-demo.json"
    command = ["demo", "--env-file", ""]
    with _one_worker_at_a_time("tiny-demo"):
        if not printed.exists():
            folder.mkdir()
            if wanted(SLOW):
                args = [sys.executable, "-m", "smolbox", *command]
                done = subprocess.run(args, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                                      text=True, timeout=600)
                code, out, err = done.returncode, done.stdout, done.stderr
            else:
                import contextlib
                import io

                from smolbox.cli import main

                args, stdout, stderr = ["smolbox.cli.main", *command], io.StringIO(), io.StringIO()
                with contextlib.chdir(folder), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    code = main(command)
                out, err = stdout.getvalue(), stderr.getvalue()
            printed.write_text(json.dumps({"args": args, "returncode": code, "stdout": out, "stderr": err}))
    result = subprocess.CompletedProcess(**json.loads(printed.read_text()))
    assert result.returncode == 0, result.stderr[-3000:]
    result.folder = folder
    return result


@pytest.fixture(scope="session")
def tiny_root(tiny_demo):
    """The demo's folder, with runs/ and exports/."""
    return tiny_demo.folder


@pytest.fixture(scope="session")
def tiny_config(tiny_root):
    """configs/tiny.yaml with the session's runs/ and exports/ folders; keyword overrides as `**{"train.beta": 0.2}`."""
    from smolbox.config import load_config

    def make(**overrides):
        base = {"run.output_dir": str(tiny_root / "runs"), "export.output_dir": str(tiny_root / "exports")}
        return load_config("tiny", overrides={**base, **overrides}, env={}, dotenv=None)

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_config):
    """The demo's run: configs/tiny.yaml as it is (16 steps, a checkpoint every 4, evaluation every 8), runs/tiny.
    Shared: a test that trains further or resumes does so in a copy."""
    from smolbox.train import train

    run = train(tiny_config())  # the demo completed it: train reads it back and trains nothing
    assert run.global_step == run.manifest["global_step"] and run.resumed_from is None
    return run


def _finished_export(folder: Path):
    """An export folder read back (its final name appears only when the export is complete)."""
    import json

    from smolbox.export import ExportResult

    return ExportResult(folder, json.loads((folder / "manifest.json").read_text()), json.loads((folder / "parity.json").read_text()))


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tiny_config):
    """That run exported with every variant (fused decoder and vision encoder): exports/tiny, as the demo wrote it."""
    return _finished_export(Path(tiny_config().export.output_dir) / tiny_run.run_dir.name)


@pytest.fixture(scope="session")
def tiny_export_traced(tiny_run, tiny_config):
    """The same run with the torch.onnx-traced decoder and vision encoder (export.decoder/vision=traced), fp32 only,
    beside the demo's export: the first worker to need it exports it, the others wait and read it."""
    from smolbox.export import export

    cfg = tiny_config(**{"export.decoder": "traced", "export.vision": "traced", "export.variants": ["fp32"],
                         "export.name": "tiny-traced"})
    folder = Path(cfg.export.output_dir) / cfg.export.name
    with _one_worker_at_a_time("tiny-traced"):
        return _finished_export(folder) if folder.exists() else export(cfg)


@pytest.fixture(scope="session")
def merged(tiny_export):
    """The merged PyTorch model of tiny_export and its processor, loaded from the export folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_export.folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(tiny_export.folder)
