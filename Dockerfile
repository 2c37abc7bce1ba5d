# syntax=docker/dockerfile:1
# The qlora-runner image: `qlora run` (training pods, the default entrypoint) and
# `qlora operator` (the Helm chart's Deployment), with the GPU stack pinned in pyproject.toml
# (extra `gpu`: Unsloth and the transformers/trl/peft/bitsandbytes versions it accepts).
#
#   docker build --build-arg BASE_IMAGE=<your mirror>/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
#
# BASE_IMAGE must be an Ubuntu 24.04 CUDA runtime image; its default names no registry host,
# so your container runtime's configured registry (or mirror) supplies it.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
# Packages come from the Ubuntu snapshot archive as it was at APT_SNAPSHOT, so the pinned
# versions below stay installable and a rebuild installs the same bytes. Move the snapshot
# and the pins together.
ARG APT_SNAPSHOT=20260928T000000Z
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Python 3.12 with its headers, and a C compiler: Triton (under Unsloth's kernels) compiles a
# small CUDA launcher against Python.h the first time a kernel runs.
RUN apt-get update --snapshot "${APT_SNAPSHOT}" \
    && apt-get install -y --no-install-recommends \
        python3.12=3.12.3-1ubuntu0.17 \
        python3.12-venv=3.12.3-1ubuntu0.17 \
        python3.12-dev=3.12.3-1ubuntu0.17 \
        gcc=4:13.2.0-7ubuntu1 \
        libc6-dev=2.39-0ubuntu8.9 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*

FROM base AS build
WORKDIR /src
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY runner ./runner
# `gpu` pulls in `train` (versions pinned in pyproject.toml); `k8s` is for `qlora operator`.
RUN pip install --no-cache-dir "/src[gpu,k8s]" \
    && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
    && qlora --version

FROM base AS runtime
ARG BASE_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="qlora-runner" \
      org.opencontainers.image.description="Kubernetes-native QLoRA fine-tuning: qlora run (training pods) and qlora operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="qlora-runner" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
COPY --from=build /opt/venv /opt/venv
# A fixed non-root UID (the rendered pods' runAsUser) and the writable directories the pods
# mount emptyDirs on; created here too so a plain `docker run` works.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/cache/qlora \
        --shell /usr/sbin/nologin qlora \
    && install -d -o 10001 -g 10001 -m 0750 /var/cache/qlora /var/lib/qlora /etc/qlora
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/cache/qlora \
    XDG_CACHE_HOME=/var/cache/qlora/xdg \
    HF_HOME=/var/cache/qlora/huggingface \
    TRITON_CACHE_DIR=/var/cache/qlora/triton \
    QLORA_WORK_DIR=/var/lib/qlora/work
WORKDIR /var/lib/qlora
USER 10001:10001
ENTRYPOINT ["qlora", "run"]
