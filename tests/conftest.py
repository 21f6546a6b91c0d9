import os

import pytest

# The tiny bundle is built once per machine into the smolbox cache (SMOLBOX_CACHE, default ~/.cache/smolbox), in a
# folder named after its builder's code and library versions, so a changed builder builds afresh and a session
# never reuses a stale bundle. A build pretrains the model (about a minute on a CPU core); tests/test_tiny.py checks
# what a build makes, and that it makes the same bundle again.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bundle():
    from smolbox import tiny

    return tiny.ensure_bundle()
