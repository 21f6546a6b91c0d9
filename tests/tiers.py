"""The suite's opt-in tiers, one environment switch each; scripts/test runs the quick suite without them, and
.ci/run sets both (docs/containers.md, "What CI checks").

- SMOLBOX_SLOW_TESTS=1: the tests marked `slow`. Each starts a process of the stack of its own (torchrun jobs, a run
  or an export SIGKILLed mid-way, the demo as a user runs it, the installed wheel, the library-noise check, CLI
  commands that import the training stack, a server with settings of its own, a pytest session), compiles blocks,
  traces graphs with torch.onnx or builds the tiny bundle a second time: seconds to tens of seconds of a CPU core.
  The quick suite keeps one process per worker and the session's shared run, export and server.
- SMOLBOX_CONTAINER_TESTS=1: tests/test_containers.py's image builds and runs (root or docker, minutes).
"""

import os

SLOW = "SMOLBOX_SLOW_TESTS"
CONTAINERS = "SMOLBOX_CONTAINER_TESTS"


def wanted(switch: str) -> bool:
    return os.environ.get(switch, "").strip().lower() in {"1", "true", "yes", "on"}
