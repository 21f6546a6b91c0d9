# smolbox serving image: `smolbox serve` over an ONNX export with ONNX Runtime. No torch (docs/containers.md).
# Build with `just build-serve`; `just export` then bakes a run's export in (docker/serve-model.Dockerfile).
# Without a baked export, mount one at /models/export (read-only is fine).
#
# Build args:
#   BASE_IMAGE   required, pinned by digest (docker/base-images.lock). An apt-based image with Python 3.11 packages:
#                nvidia/cuda:13.0.2-base-ubuntu22.04 for ORT=cuda, debian:bookworm-slim for ORT=cpu.
#   ORT          cuda (default: onnxruntime-gpu[cuda,cudnn], CUDA 13 wheels; requirements/serve-cuda.lock)
#                | cpu (onnxruntime; requirements/serve-cpu.lock).
#   LOCK_SHA256  required. sha256 of that lock; checked against the file, then kept as label and env.
#   GIT_COMMIT   the commit built (label and env).
#   PIP_INDEX_URL, UID, GID: as in train.Dockerfile.
# Runs as a non-root user with a read-only root filesystem: docker run --read-only --tmpfs /tmp ...

ARG BASE_IMAGE

FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    ORT_TELEMETRY_DISABLED=1

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/smolbox/venv

# Build-only input: a CA bundle for pip, if there is one (README.md makes the wildcard match something).
COPY docker/build-extra/README.md docker/build-extra/ca.cr[t] /tmp/build-extra/
# ARGs are declared where they are used: the classic builder keys every later RUN's cache on them.
ARG ORT=cuda
# Only this image's lock: a change to another lock leaves this layer cached. (ORT is cuda or cpu.)
COPY requirements/serve-${ORT}.lock /tmp/serve.lock
ARG LOCK_SHA256=""
ARG PIP_INDEX_URL
RUN lock=/tmp/serve.lock \
 && { [ -n "$LOCK_SHA256" ] || { echo "LOCK_SHA256 is required: --build-arg LOCK_SHA256=\$(sha256sum requirements/serve-${ORT}.lock)" >&2; exit 1; }; } \
 && { echo "${LOCK_SHA256%% *}  $lock" | sha256sum --check --strict --status \
      || { echo "LOCK_SHA256=$LOCK_SHA256 is not the sha256 of requirements/serve-${ORT}.lock" >&2; exit 1; }; } \
 && { [ ! -f /tmp/build-extra/ca.crt ] || export PIP_CERT=/tmp/build-extra/ca.crt; } \
 && mkdir -p /tmp/build-extra/wheels \
 && /opt/smolbox/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary :all: \
      --find-links /tmp/build-extra/wheels -r "$lock" \
 && /opt/smolbox/venv/bin/pip check

COPY pyproject.toml README.md /opt/smolbox/src/
COPY requirements/ /opt/smolbox/src/requirements/
COPY configs/ /opt/smolbox/src/configs/
COPY entrypoints/ /opt/smolbox/src/entrypoints/
COPY smolbox/ /opt/smolbox/src/smolbox/
# The serving stack imports without torch (and the image must not carry it); setuptools was only needed to install.
RUN /opt/smolbox/venv/bin/pip install --no-cache-dir --no-compile --no-deps --no-build-isolation -e /opt/smolbox/src \
 && /opt/smolbox/venv/bin/python -c "import importlib.util as u, sys; sys.exit('torch is installed' if u.find_spec('torch') else 0)" \
 && /opt/smolbox/venv/bin/python -c "import onnxruntime, fastapi, uvicorn, smolbox.serve, smolbox.runtime, smolbox.preprocess; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" \
 && /opt/smolbox/venv/bin/pip uninstall --yes --no-cache-dir setuptools

FROM ${BASE_IMAGE}
ARG UID=1000
ARG GID=1000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid "${GID}" smolbox \
 && useradd --no-log-init --create-home --uid "${UID}" --gid "${GID}" --shell /usr/sbin/nologin smolbox \
 && mkdir -p /models/export

# The venv and the source in two layers: a source change alone copies the source again, not the venv (which a
# README.md change does copy again: smolbox's metadata there carries it; the venv is small, docs/containers.md).
COPY --from=builder /opt/smolbox/venv /opt/smolbox/venv
COPY --from=builder /opt/smolbox/src /opt/smolbox/src

# Build facts last, so a new commit or lock only rebuilds metadata layers.
ARG BASE_IMAGE
ARG ORT=cuda
ARG LOCK_SHA256=""
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="smolbox-serve" \
      org.opencontainers.image.description="OpenAI-compatible chat server over a smolbox ONNX export (ONNX Runtime, no torch)" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.smolbox.lock="requirements/serve-${ORT}.lock" \
      io.smolbox.lock-sha256="${LOCK_SHA256}" \
      io.smolbox.onnxruntime="${ORT}"

# ORT_*: ONNX Runtime >= 1.29 on Linux uploads telemetry (1DS) unless opted out; 1.31 reads ORT_DISABLE_TELEMETRY,
# newer sources ORT_TELEMETRY_DISABLED. The images make no outbound requests of their own accord.
ENV PATH=/opt/smolbox/venv/bin:/opt/smolbox/src/entrypoints:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMOLBOX_BASE_IMAGE=${BASE_IMAGE} \
    SMOLBOX_LOCK_SHA256=${LOCK_SHA256} \
    SMOLBOX_GIT_COMMIT=${GIT_COMMIT} \
    SMOLBOX_ORT=${ORT} \
    SMOLBOX_SERVE__HOST=0.0.0.0 \
    SMOLBOX_SERVE__PORT=8000 \
    SMOLBOX_SERVE__MODEL=/models/export \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ORT_DISABLE_TELEMETRY=1 \
    ORT_TELEMETRY_DISABLED=1

USER ${UID}:${GID}
WORKDIR /models
EXPOSE 8000
# stdlib only (no curl in the image); proxies disabled so a proxy setting cannot swallow loopback.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('SMOLBOX_SERVE__PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/opt/smolbox/src/entrypoints/serve"]
