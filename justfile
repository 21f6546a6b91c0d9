# smolbox tasks. `just` lists them; just itself: PATH="$(bash scripts/tools):$PATH". Settings: an optional .env (.env.example).
# Training and serving run in containers (compose.yaml); `test` runs the suite on this machine.
# Arguments after a recipe name go to the smolbox CLI, e.g. `just train --train.learning_rate 2e-5`.

set dotenv-load := true
set positional-arguments := true
set shell := ["bash", "-euo", "pipefail", "-c"]

compose := env("COMPOSE", "docker compose")
runs_dir := env("SMOLBOX_RUNS_DIR", "./runs")
exports_dir := env("SMOLBOX_EXPORTS_DIR", "./exports")
train_image := env("SMOLBOX_TRAIN_IMAGE", "smolbox-train") + ":" + env("SMOLBOX_TAG", "latest")
serve_image := env("SMOLBOX_SERVE_IMAGE", "smolbox-serve")

# List the recipes
default:
    @{{ just_executable() }} --list --justfile {{ justfile() }}

# Build the training and serving images (base images by digest from docker/base-images.lock)
build: build-train build-serve

# Build the training image (SMOLBOX_TORCH=cuda|cpu)
build-train:
    bash scripts/build-image train

# Build the serving image, without a model (SMOLBOX_ORT=cuda|cpu)
build-serve:
    bash scripts/build-image serve

# Preflight checks in the training image, on the reserved GPUs
verify *ARGS: _dirs
    {{ compose }} run --rm verify "$@"

# Train in the training image (SMOLBOX_CONFIG or the default config); resumes automatically
train *ARGS: _dirs
    {{ compose }} run --rm train "$@"

# Export a run to ONNX in the training image, then bake it into smolbox-serve:<export name>
export *ARGS: _dirs
    {{ compose }} run --rm export "$@"
    name=$({{ just_executable() }} --justfile {{ justfile() }} _export-name "$@") && \
      bash scripts/bake-serve-image "{{ exports_dir }}/$name" "{{ serve_image }}:$name" "${SMOLBOX_SERVE__VARIANT:-auto}"

# Score the run (base against adapter) and its export (every ONNX variant) on the held-out split, in the training image
eval *ARGS: _dirs
    {{ compose }} run --rm eval "$@"

# Serve a baked export (default: the configured run's) on SMOLBOX_SERVE_BIND:SMOLBOX_SERVE_PORT
serve NAME="":
    name="$1"; [ -n "$name" ] || name=$({{ just_executable() }} --justfile {{ justfile() }} _export-name); \
      SMOLBOX_SERVE_TAG="$name" {{ compose }} up serve

# The whole pipeline on the embedded tiny bundle in the training image: CPU, offline, no GPU; bakes smolbox-serve:tiny
demo: _dirs
    docker run --rm --network none --user "${SMOLBOX_UID:-1000}:${SMOLBOX_GID:-1000}" \
      -e HF_HUB_OFFLINE=1 -e HF_DATASETS_OFFLINE=1 \
      -v "$(realpath '{{ runs_dir }}'):/data/runs" -v "$(realpath '{{ exports_dir }}'):/data/exports" \
      "{{ train_image }}" demo
    bash scripts/bake-serve-image "{{ exports_dir }}/tiny" "{{ serve_image }}:tiny" fp32

# The quick test suite on this machine; arguments go to pytest (tests/tiers.py)
test *ARGS:
    bash scripts/test "$@"

# The quick suite and the slow checks: what CI runs, less the container checks (test-containers)
test-slow *ARGS:
    SMOLBOX_SLOW_TESTS=1 bash scripts/test "$@"

# Container CI: build both images on CPU against a local Debian base, run and compare them, lint, check compose
test-containers:
    bash scripts/ci-containers

# Lint the Dockerfiles (hadolint), check the locks, validate compose.yaml
lint:
    "$(bash scripts/tools)/hadolint" docker/*.Dockerfile
    python3 scripts/check_locks.py
    {{ compose }} config --quiet

# Rewrite the hash locks in requirements/ (TORCH_CUDA=cu130|cu128|cu126 picks the training image's CUDA line)
lock:
    bash scripts/lock

# Resolve the base image tags of docker/base-images.txt to digests (docker/base-images.lock)
lock-base:
    bash scripts/lock-base

# The export name a config resolves to (export.name, else run.name)
_export-name *ARGS:
    @docker run --rm --network none -v "$PWD:/opt/smolbox/project:ro" -e SMOLBOX_ENV_FILE=/opt/smolbox/project/.env \
      "{{ train_image }}" config "$@" | python3 scripts/config_value.py export.name run.name

# Host folders the containers write to, owned by the container user (also when just runs as root)
_dirs:
    @mkdir -p "{{ runs_dir }}" "{{ exports_dir }}"
    @[ "$(id -u)" != 0 ] || chown "${SMOLBOX_UID:-1000}:${SMOLBOX_GID:-1000}" "{{ runs_dir }}" "{{ exports_dir }}"
