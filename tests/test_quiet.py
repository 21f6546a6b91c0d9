"""smolbox.quiet: the library noise it silences is really what those libraries say, and only that goes."""

import json
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: each library warns once per import or call, and pytest has its own warning filters.
SCRIPT = r"""
import importlib, json, logging, sys, warnings

warnings.simplefilter("always")
import torch.utils.mkldnn as mkldnn
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

def caught(action):
    with warnings.catch_warnings(record=True) as seen:
        action()
    return [f"{w.category.__name__}: {w.message}" for w in seen]

def noisy():
    importlib.reload(mkldnn)  # torch's own module: decorated with the deprecated torch.jit.script_method
    get_peft_model(AutoModelForImageTextToText.from_pretrained(sys.argv[1]), LoraConfig(target_modules=["q_proj"]))

class Keep(logging.Handler):
    lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the logger and message of bitsandbytes 0.50.2
bnb.addHandler(Keep())
def bnb_says():
    bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
    bnb.warning("any other bitsandbytes warning")

before = caught(noisy)
bnb_says()
import smolbox
after = caught(noisy)
bnb_says()
print(json.dumps({"before": before, "after": after, "bnb": Keep.lines}))
"""


@pytest.mark.slow  # a fresh process that imports the training stack and loads the model
def test_known_library_noise_is_silenced_and_nothing_else(tiny_bundle):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle / "model")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    known = ["DeprecationWarning: `torch.jit.script_method` is deprecated",
             "FutureWarning: `is_gradient_checkpointing` is deprecated"]
    for message in known:  # the libraries really say it (else this test proves nothing) ...
        assert any(w.startswith(message) for w in seen["before"]), (message, seen["before"])
    # ... and with smolbox imported they no longer do, while any other warning still shows
    assert not [w for w in seen["after"] if any(w.startswith(m) for m in known)], seen["after"]
    assert seen["bnb"][0].startswith("Failed to load CPU gemm_4bit_forward") and seen["bnb"][1:] == [
        "any other bitsandbytes warning", "any other bitsandbytes warning"]


def test_pytest_applies_the_same_filters_to_the_suite():
    """tests/conftest.py hands smolbox.quiet's filters to pytest, which resets warning filters around each test."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`torch.jit.script_method` is deprecated.", DeprecationWarning, "_script.py", 1,
                               module="torch.jit._script")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "modeling_utils.py", 2,
                               module="transformers.modeling_utils")
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
