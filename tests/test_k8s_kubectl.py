"""``qlora render FILE | kubectl apply --dry-run=server -f -`` against the test API server, as
a new user would try it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner.k8s.client import NEWER_FIELDS
from tests.conftest import require_binary
from tests.fixtures.kube import BIN_ENV, ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = [REPO / "examples" / "llama-3.1-8b.yaml", REPO / "examples" / "llama-3.3-70b.yaml"]


def render(spec: Path, ns: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    res = subprocess.run([sys.executable, "-m", "runner", "render", str(spec), "-n", ns],
                         env=env, text=True, capture_output=True, timeout=60, check=True)
    return res.stdout


def kubectl(cp: ControlPlane, args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    exe = require_binary("kubectl", env_dir=BIN_ENV)
    return subprocess.run([exe, "--kubeconfig", str(cp.kubeconfig), *args], input=stdin,
                          text=True, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_render_pipes_into_kubectl_apply_dry_run_server(
    kube_control_plane: ControlPlane, kube_namespace: str, spec: Path
) -> None:
    manifest = render(spec, kube_namespace)
    # This 1.20 server predates podFailurePolicy & co.: without client-side validation the
    # server accepts the objects and drops those fields (they are schema-checked offline).
    res = kubectl(kube_control_plane, ["apply", "--dry-run=server", "--validate=false",
                                       "-f", "-"], manifest)
    assert res.returncode == 0, res.stderr
    assert re.search(r"configmap/\S+ created \(server dry run\)", res.stdout), res.stdout
    assert re.search(r"job.batch/\S+ created \(server dry run\)", res.stdout), res.stdout
    jobs = kube_control_plane.request("GET", f"/apis/batch/v1/namespaces/{kube_namespace}/jobs")
    assert jobs["items"] == []  # a dry run creates nothing


def test_kubectl_validation_only_objects_to_fields_newer_than_the_server(
    kube_control_plane: ControlPlane, kube_namespace: str
) -> None:
    res = kubectl(kube_control_plane, ["apply", "--dry-run=server", "-f", "-"],
                  render(EXAMPLES[0], kube_namespace))
    unknown = set(re.findall(r'unknown field "(\w+)"', res.stderr))
    newer = {path.rsplit(".", 1)[-1] for _, path, _ in NEWER_FIELDS}
    assert res.returncode == 0 or (unknown and unknown <= newer), res.stderr
