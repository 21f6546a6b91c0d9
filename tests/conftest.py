import os
import shutil
import tempfile

import pytest

# What the suite caches goes into one temporary folder, removed when the session ends: one tiny bundle per session,
# built from scratch (so the build itself is tested), and the Hugging Face caches (datasets' arrow files and locks),
# so nothing lands in ~/.cache. A caller may point SMOLBOX_CACHE or HF_HOME somewhere on purpose.
SCRATCH = tempfile.mkdtemp(prefix="smolbox-test-")
os.environ.setdefault("SMOLBOX_CACHE", os.path.join(SCRATCH, "smolbox"))
os.environ.setdefault("HF_HOME", os.path.join(SCRATCH, "huggingface"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # pytest resets warning filters around each test: give it smolbox's (smolbox.quiet) as its own.
    from smolbox import quiet

    for line in quiet.pytest_filters():
        config.addinivalue_line("filterwarnings", line)


def pytest_unconfigure(config):
    shutil.rmtree(SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_bundle():
    from smolbox import tiny

    return tiny.ensure_bundle()
