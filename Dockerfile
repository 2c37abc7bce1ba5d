# syntax=docker/dockerfile:1
# The qlora-runner image: `qlora run` (training pods, the default entrypoint) and
# `qlora operator` (the Helm chart's Deployment), from one Dockerfile.
#
# No CUDA base image is needed: torch, bitsandbytes and Unsloth from PyPI bring their CUDA
# user-space libraries (torch's nvidia-* wheels), and the node's driver comes in through the
# NVIDIA container toolkit. BASE_IMAGE is any Debian or Ubuntu image; Python >= 3.11 and venv
# are installed from its archive when it lacks them. Its default names no registry host, so the
# container runtime's configured registry (or mirror) supplies it.
#
#   GPU nodes (default):  docker build -t REGISTRY/qlora-runner:TAG .
#   CPU only:             docker build --build-arg EXTRAS=train,k8s \
#                           --build-arg TORCH=torch==2.13.0 --build-arg TORCH_INDEX_URL=<CPU wheel index> .
#
# scripts/build-image.sh builds it with podman from a locally made Debian base and passes the
# machine's pip configuration in as build secrets and named build contexts (pip-local-N,
# pip-files), which replace the empty stages below; nothing of them stays in the image.
ARG BASE_IMAGE=debian:bookworm-slim

FROM scratch AS pip-local-0
FROM scratch AS pip-local-1
FROM scratch AS pip-local-2
FROM scratch AS pip-local-3
FROM scratch AS pip-files

FROM ${BASE_IMAGE} AS runtime
# EXTRAS: the pyproject.toml extras to install (`gpu` = Unsloth + the pinned training stack).
# TORCH: a torch requirement installed (and held) first, e.g. the CPU build for CI images.
ARG EXTRAS=gpu,k8s
ARG TORCH=
ARG TORCH_INDEX_URL=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Everything from the build context comes in by COPY, whose cache key is the files' content
# (buildah does not hash what a RUN bind-mounts from the context, so a bind-mounted source
# would be reused from cache after it changed). The two small build helpers and the package
# source stay in /opt/qlora-runner; nothing else of the build does.
COPY scripts/tools/os_packages.sh scripts/tools/pyproject_requirements.py /opt/qlora-runner/build/
# OS packages first (they change least), then the fixed non-root UID the rendered pods run as
# and the writable directories they mount emptyDirs on (created so a plain run works too).
RUN sh /opt/qlora-runner/build/os_packages.sh "${EXTRAS}" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /var/cache/qlora \
        --shell /usr/sbin/nologin qlora \
    && install -d -o 10001 -g 10001 -m 0750 /var/cache/qlora /var/lib/qlora /etc/qlora
# The dependencies in their own layer, before the source: a change to runner/ rebuilds only the
# last small layer. pip's settings, CA and local folders are mounted for this step only. Every
# mount target sits directly in /tmp: buildah removes a mount point it created, but not the
# parent directories it created for it (those would stay in the layer, empty).
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml /opt/qlora-runner/src/
RUN --mount=type=secret,id=pip-conf,target=/tmp/pip-conf \
    --mount=type=secret,id=pip-ca,target=/tmp/pip-ca \
    --mount=type=bind,from=pip-local-0,target=/tmp/pip-local-0 \
    --mount=type=bind,from=pip-local-1,target=/tmp/pip-local-1 \
    --mount=type=bind,from=pip-local-2,target=/tmp/pip-local-2 \
    --mount=type=bind,from=pip-local-3,target=/tmp/pip-local-3 \
    --mount=type=bind,from=pip-files,target=/tmp/pip-files \
    if [ -s /tmp/pip-conf ]; then export PIP_CONFIG_FILE=/tmp/pip-conf; fi \
    && python3 -m venv /opt/venv \
    && python3 /opt/qlora-runner/build/pyproject_requirements.py /opt/qlora-runner/src/pyproject.toml "${EXTRAS}" >/tmp/requirements.txt \
    && echo "setuptools>=69" >>/tmp/requirements.txt \
    && echo "${TORCH}" >/tmp/torch.txt \
    && if [ -n "${TORCH}" ]; then \
        pip install --no-cache-dir --disable-pip-version-check -c /tmp/torch.txt \
            ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} "${TORCH}"; \
    fi \
    && pip install --no-cache-dir --disable-pip-version-check -c /tmp/torch.txt -r /tmp/requirements.txt \
    && rm -rf /tmp/requirements.txt /tmp/torch.txt
# The package itself, built from a copy in /tmp (the build writes beside the source).
COPY README.md /opt/qlora-runner/src/
COPY runner /opt/qlora-runner/src/runner
RUN cp -r /opt/qlora-runner/src /tmp/src \
    && pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src \
    && qlora --version
ENV HOME=/var/cache/qlora \
    XDG_CACHE_HOME=/var/cache/qlora/xdg \
    HF_HOME=/var/cache/qlora/huggingface \
    TRITON_CACHE_DIR=/var/cache/qlora/triton \
    QLORA_WORK_DIR=/var/lib/qlora/work
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="qlora-runner" \
      org.opencontainers.image.description="Kubernetes-native QLoRA fine-tuning: qlora run (training pods) and qlora operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="qlora-runner" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.qlora-runner.extras="${EXTRAS}"
WORKDIR /var/lib/qlora
USER 10001:10001
ENTRYPOINT ["qlora", "run"]
