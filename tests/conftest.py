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
# One intra-op thread for torch here and in every process a test starts (read when torch is first imported): the
# tiny model's 64-wide ops gain nothing from more, contending threads on a shared machine cost several times the
# time (docs/notes.md), and the same thread count everywhere gives in-process and command-line runs the same bits.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# ---- one tiny run, trained and exported once, for every module that needs one ---------------------------------


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory, tiny_bundle):
    return tmp_path_factory.mktemp("tiny")


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

    return train(tiny_config())


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tiny_config):
    """That run exported with every variant (fused decoder and vision encoder): exports/tiny."""
    from smolbox.export import export

    return export(tiny_config())


@pytest.fixture(scope="session")
def tiny_export_traced(tiny_run, tiny_config):
    """The same run with the torch.onnx-traced decoder and vision encoder (export.decoder/vision=traced), fp32 only."""
    from smolbox.export import export

    return export(tiny_config(**{"export.decoder": "traced", "export.vision": "traced", "export.variants": ["fp32"],
                                 "export.name": "tiny-traced"}))


@pytest.fixture(scope="session")
def merged(tiny_export):
    """The merged PyTorch model of tiny_export and its processor, loaded from the export folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_export.folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(tiny_export.folder)
