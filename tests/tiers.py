"""The suite's opt-in tiers, one environment switch each; scripts/test runs the quick suite without them, and
.ci/run sets both (docs/containers.md, "What CI checks").

- SMOLBOX_SLOW_TESTS=1: the tests marked `slow`. They start fresh processes of the training or export stack (torchrun
  jobs, runs and exports SIGKILLed mid-way, the installed wheel, the library-noise check), compile blocks, trace
  graphs with torch.onnx or build the tiny bundle a second time: each costs tens of seconds of a CPU core.
- SMOLBOX_CONTAINER_TESTS=1: tests/test_containers.py's image builds and runs (root or docker, minutes).
"""

import os

SLOW = "SMOLBOX_SLOW_TESTS"
CONTAINERS = "SMOLBOX_CONTAINER_TESTS"


def wanted(switch: str) -> bool:
    return os.environ.get(switch, "").strip().lower() in {"1", "true", "yes", "on"}
