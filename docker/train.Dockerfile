# smolbox training image: the verify, train and export stages (docs/containers.md).
# Build with `just build-train` (base image from docker/base-images.lock); CI builds it in scripts/ci-containers.
#
# Build args:
#   BASE_IMAGE         required. An apt-based image with Python 3.11 packages (Debian bookworm, Ubuntu 22.04),
#                      pinned by digest. Production: nvidia/cuda:13.0.2-base-ubuntu22.04@sha256:... (CUDA forward-
#                      compatibility libraries, no CUDA libraries we don't use: torch's wheels bring their own).
#   TORCH              cuda (default: requirements/train-cuda.lock) | cpu (requirements/train-cpu.lock; CI).
#   LOCK_SHA256        required. sha256 of that lock; checked against the file, then kept as label and env.
#   GIT_COMMIT         the commit the image is built from (label and env; every run manifest records it).
#   FLASH_ATTN_WHEEL   optional URL of a prebuilt flash-attn wheel matching torch, CUDA and cp311 ...
#   FLASH_ATTN_SHA256  ... and its sha256 (required with the URL). Default: no flash-attn (sdpa attention).
#   PIP_INDEX_URL      optional package index (a mirror); the locks' hashes are checked whatever the source.
#   UID, GID           uid and gid of the non-root user `smolbox` (default 1000:1000; the image runs as them).
# No secrets at build time: HF_TOKEN is read at run time only (compose env_file / docker run -e).

ARG BASE_IMAGE

# ---- builder: a virtualenv filled strictly from the hash lock ----------------------------------------------------
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    ORT_TELEMETRY_DISABLED=1

# Unpinned apt versions: the base image digest pins the distribution; these are the distribution's Python 3.11.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/smolbox/venv

# Build-only inputs (docker/build-extra/README.md): a CA bundle for pip, local wheels. Not in the final image.
COPY docker/build-extra/ /tmp/build-extra/
# ARGs are declared where they are used: the classic builder keys every later RUN's cache on them.
ARG TORCH=cuda
# Only this image's lock: a change to another lock leaves this layer cached. (TORCH is cuda or cpu.)
COPY requirements/train-${TORCH}.lock /tmp/train.lock
ARG LOCK_SHA256=""
ARG PIP_INDEX_URL
RUN lock=/tmp/train.lock \
 && { [ -n "$LOCK_SHA256" ] || { echo "LOCK_SHA256 is required: --build-arg LOCK_SHA256=\$(sha256sum requirements/train-${TORCH}.lock)" >&2; exit 1; }; } \
 && { echo "${LOCK_SHA256%% *}  $lock" | sha256sum --check --strict --status \
      || { echo "LOCK_SHA256=$LOCK_SHA256 is not the sha256 of requirements/train-${TORCH}.lock" >&2; exit 1; }; } \
 && { [ ! -f /tmp/build-extra/ca.crt ] || export PIP_CERT=/tmp/build-extra/ca.crt; } \
 && mkdir -p /tmp/build-extra/wheels \
 && /opt/smolbox/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary :all: \
      --find-links /tmp/build-extra/wheels -r "$lock" \
 && /opt/smolbox/venv/bin/pip check

# Optional flash-attn: a pinned prebuilt wheel, installed only with its sha256 (hash-checking mode).
ARG FLASH_ATTN_WHEEL=""
ARG FLASH_ATTN_SHA256=""
RUN if [ -n "$FLASH_ATTN_WHEEL" ]; then \
      { [ -n "$FLASH_ATTN_SHA256" ] || { echo "FLASH_ATTN_WHEEL needs FLASH_ATTN_SHA256" >&2; exit 1; }; } \
      && { [ ! -f /tmp/build-extra/ca.crt ] || export PIP_CERT=/tmp/build-extra/ca.crt; } \
      && echo "flash-attn @ ${FLASH_ATTN_WHEEL} --hash=sha256:${FLASH_ATTN_SHA256}" > /tmp/flash-attn.txt \
      && /opt/smolbox/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r /tmp/flash-attn.txt \
      && /opt/smolbox/venv/bin/pip check; \
    else echo "flash-attn: none"; fi

# ---- final image ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG UID=1000
ARG GID=1000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc, g++ and python3.11-dev: train.compile (on in default.yaml and lowmem.yaml) generates code at the first step,
# Triton kernels on CUDA, whose launcher is built with a C compiler against Python's headers, and C++ on CPU
# (smolbox verify checks for them).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-dev gcc g++ \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid "${GID}" smolbox \
 && useradd --no-log-init --create-home --uid "${UID}" --gid "${GID}" --shell /bin/bash smolbox \
 && mkdir -p /data/cache /data/runs /data/exports \
 && chown -R "${UID}:${GID}" /data

# The venv (1.8 GB) from the builder holds the lock's packages only, so it stays cached whatever else changes; smolbox
# is installed here, after it: a new commit (its source, README.md, configs) rebuilds only these small layers
# (docs/containers.md, "Building").
COPY --from=builder /opt/smolbox/venv /opt/smolbox/venv

# smolbox itself, editable from its source tree: configs/ and requirements/train.lock sit next to the package,
# where config.py and verify.py look for them.
COPY pyproject.toml README.md /opt/smolbox/src/
COPY requirements/ /opt/smolbox/src/requirements/
COPY configs/ /opt/smolbox/src/configs/
COPY entrypoints/ /opt/smolbox/src/entrypoints/
COPY smolbox/ /opt/smolbox/src/smolbox/
ARG TORCH=cuda
RUN cp "/opt/smolbox/src/requirements/train-${TORCH}.lock" /opt/smolbox/src/requirements/train.lock \
 && /opt/smolbox/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile --no-deps --no-build-isolation \
      -e /opt/smolbox/src \
 && PYTHONDONTWRITEBYTECODE=1 /opt/smolbox/venv/bin/smolbox config --config default --env-file "" > /dev/null

# Build facts last, so a new commit or lock only rebuilds metadata layers.
ARG BASE_IMAGE
ARG TORCH=cuda
ARG LOCK_SHA256=""
ARG GIT_COMMIT=unknown
ARG FLASH_ATTN_WHEEL=""
LABEL org.opencontainers.image.title="smolbox-train" \
      org.opencontainers.image.description="SmolVLM DPO training: smolbox verify / train / export / eval" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.smolbox.lock="requirements/train-${TORCH}.lock" \
      io.smolbox.lock-sha256="${LOCK_SHA256}" \
      io.smolbox.torch="${TORCH}" \
      io.smolbox.flash-attn-wheel="${FLASH_ATTN_WHEEL:-none}"

# ORT_*: ONNX Runtime >= 1.29 on Linux uploads telemetry (1DS) unless opted out; 1.31 reads ORT_DISABLE_TELEMETRY,
# newer sources ORT_TELEMETRY_DISABLED. The images make no outbound requests of their own accord.
# SMOLBOX_BASE_IMAGE / SMOLBOX_LOCK_SHA256 / SMOLBOX_GIT_COMMIT go into every run manifest (manifest.image_labels).
# MPLCONFIGDIR: matplotlib's font cache (plots of runs and evals) on the cache volume, writable whatever --user runs it.
ENV PATH=/opt/smolbox/venv/bin:/opt/smolbox/src/entrypoints:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMOLBOX_BASE_IMAGE=${BASE_IMAGE} \
    SMOLBOX_LOCK_SHA256=${LOCK_SHA256} \
    SMOLBOX_GIT_COMMIT=${GIT_COMMIT} \
    SMOLBOX_TORCH=${TORCH} \
    SMOLBOX_FLASH_ATTN_WHEEL=${FLASH_ATTN_WHEEL:-none} \
    HF_HOME=/data/cache/huggingface \
    SMOLBOX_CACHE=/data/cache/smolbox \
    MPLCONFIGDIR=/data/cache/matplotlib \
    SMOLBOX_RUN__OUTPUT_DIR=/data/runs \
    SMOLBOX_EXPORT__OUTPUT_DIR=/data/exports \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ORT_DISABLE_TELEMETRY=1 \
    ORT_TELEMETRY_DISABLED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

USER ${UID}:${GID}
WORKDIR /data
VOLUME ["/data/cache", "/data/runs", "/data/exports"]
ENTRYPOINT ["smolbox"]
CMD ["verify"]
