import os
import tempfile

import pytest

# One tiny bundle per test session, built from scratch (so the build itself is tested), unless the caller
# points SMOLBOX_CACHE at a bundle on purpose.
os.environ.setdefault("SMOLBOX_CACHE", tempfile.mkdtemp(prefix="smolbox-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bundle():
    from smolbox import tiny

    return tiny.ensure_bundle()
