#!/usr/bin/env bash
# scripts/bootstrap.sh [EXTRAS]: create .venv and install qlora-runner with EXTRAS (default
# "train"), idempotently. torch is pinned to the CPU build 2.13.0 through a constraint so no
# other package drags in a multi-GB CUDA build; the GPU image brings its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-$extras"
stamp=.venv/.qlora-bootstrap
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing qlora-runner[$extras] into .venv (first run takes a few minutes)"
  cons="$(mktemp)"; trap 'rm -f "$cons"' EXIT
  echo "torch==2.13.0" >"$cons"
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -c "$cons" torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -c "$cons" -e ".[$extras]"
  echo "$want" >"$stamp"
fi
