import os
import shutil
import tempfile

import pytest

# What the suite writes goes into one temporary folder, removed when the session passes (kept for a look when it
# fails): the Hugging Face caches (datasets' arrow files and locks) and pytest's own tmp_path folders, so nothing
# stays in /tmp. The tiny bundle is the exception: it is built once per machine into the smolbox cache
# (SMOLBOX_CACHE, default ~/.cache/smolbox), in a folder named after its builder's code and library versions, so a
# changed builder builds afresh and a session never reuses a stale bundle. A build pretrains the model (about a
# minute on a CPU core); tests/test_tiny.py checks what a build makes, and that it makes the same bundle again.
# A caller may point SMOLBOX_CACHE or HF_HOME somewhere on purpose.
SCRATCH = tempfile.mkdtemp(prefix="smolbox-test-")
_PASSED = pytest.StashKey[bool]()
os.environ.setdefault("HF_HOME", os.path.join(SCRATCH, "huggingface"))
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", SCRATCH)  # where pytest makes tmp_path folders (read lazily)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # pytest resets warning filters around each test: give it smolbox's (smolbox.quiet) as its own.
    from smolbox import quiet

    for line in quiet.pytest_filters():
        config.addinivalue_line("filterwarnings", line)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_PASSED] = exitstatus in (0, 5)  # passed, or nothing collected


def pytest_unconfigure(config):  # after every fixture's teardown
    if config.stash.get(_PASSED, False):
        shutil.rmtree(SCRATCH, ignore_errors=True)
    else:
        print(f"\nsmolbox tests: kept {SCRATCH} (caches and tmp_path folders of a failed or interrupted session)")


@pytest.fixture(scope="session")
def tiny_bundle():
    from smolbox import tiny

    return tiny.ensure_bundle()
