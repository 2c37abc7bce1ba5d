"""The generated CRD and the rendered objects on a real kube-apiserver (1.20, from the tests'
control plane): the API server is the judge of "structural schema", of server-side
validation of FineTuneJobs, of the status subresource and of the printer columns.
"""

from __future__ import annotations

import copy
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s import crd_manifest, render_objects
from runner.plan import bundled_config, make_plan
from runner.settings import Settings
from runner.spec import load_spec
from tests.fixtures.kube import ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "manifests" / "example-finetunejob.yaml"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
# Fields newer than the 1.20 test server; kubernetes-validate covers them (test_manifests_*).
NEWER_JOB_FIELDS = ("podFailurePolicy", "podReplacementPolicy", "suspend")


def ftj_path(ns: str, name: str = "") -> str:
    base = f"/apis/qlora-runner.io/v1alpha1/namespaces/{ns}/finetunejobs"
    return f"{base}/{name}" if name else base


@pytest.fixture(scope="module")
def installed_crd(kube_control_plane: ControlPlane) -> dict[str, Any]:
    """The generated CRD, created (a non-structural schema would be refused) and Established."""
    cp = kube_control_plane
    manifest = crd_manifest()
    name = manifest["metadata"]["name"]
    if cp.request("GET", f"{CRD_PATH}/{name}", ok_missing=True) is None:
        cp.request("POST", CRD_PATH, manifest)

    def established() -> dict[str, Any] | None:
        got: dict[str, Any] = cp.request("GET", f"{CRD_PATH}/{name}")
        conditions = (got.get("status") or {}).get("conditions") or []
        ok = any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
        bad = [c for c in conditions if c["type"] == "NonStructuralSchema"]
        assert not bad, bad
        return got if ok else None

    got: dict[str, Any] = cp.wait_for("the CRD to be established", established, timeout_s=30)
    return got


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return doc


def test_crd_is_structural_and_served(installed_crd: dict[str, Any]) -> None:
    (version,) = installed_crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert installed_crd["status"]["acceptedNames"]["shortNames"] == ["ftj"]


def test_server_accepts_the_example_and_rejects_bad_specs(
    kube_control_plane: ControlPlane, installed_crd: dict[str, Any], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    created = cp.request("POST", ftj_path(ns), example_doc())
    assert created["spec"]["lora"]["r"] == 16
    bad = example_doc()
    bad["metadata"]["name"] = "bad-rank"
    bad["spec"]["lora"]["r"] = 0
    with pytest.raises(AssertionError, match=r"422.*spec.lora.r"):
        cp.request("POST", ftj_path(ns), bad)
    bad = example_doc()
    bad["metadata"]["name"] = "bad-mode"
    bad["spec"]["quantization"] = {"mode": "8bit"}
    with pytest.raises(AssertionError, match=r"422.*spec.quantization.mode"):
        cp.request("POST", ftj_path(ns), bad)
    auto = example_doc()
    auto["metadata"]["name"] = "int-or-auto"
    auto["spec"]["training"]["micro_batch_size"] = 4
    auto["spec"]["training"]["gradient_accumulation_steps"] = "auto"
    auto["spec"]["training"]["max_steps"] = None
    cp.request("POST", ftj_path(ns), auto)


def test_status_subresource_keeps_what_the_operator_writes(
    kube_control_plane: ControlPlane, installed_crd: dict[str, Any], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    cp.request("POST", ftj_path(ns), example_doc())
    status = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "specHash": "ab" * 32,
        "gpuClass": "24GB",
        "vramEstimate": "17.4 GiB",
        "vramEstimateBytes": 18_683_621_376,
        "quantMode": "4bit",
        "backend": "unsloth",
        "microBatchSize": 2,
        "gradientAccumulationSteps": 8,
        "jobName": "support-bot-6c5c8dcd",
        "configMapName": "support-bot-6c5c8dcd",
        "adapterURI": "s3://adapters/support-bot/runs/20261128-0942-ab12cd",
        "retries": 1,
        "attempt": 1,
        "reason": "Succeeded",
        "message": "adapter published",
        "startTime": "2026-11-28T09:00:00Z",
        "completionTime": "2026-11-28T10:00:00Z",
        "conditions": [
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "AdapterPublished",
                "message": "ok",
                "lastTransitionTime": "2026-11-28T10:00:00Z",
                "observedGeneration": 1,
            }
        ],
    }
    got = cp.request(
        "PATCH",
        ftj_path(ns, "support-bot") + "/status",
        {"status": status},
        content_type="application/merge-patch+json",
    )
    assert got["status"] == status  # nothing pruned: the schema allows every key
    spec_write = cp.request(
        "PATCH",
        ftj_path(ns, "support-bot") + "/status",
        {"spec": {"lora": {"r": 64}}},
        content_type="application/merge-patch+json",
    )
    assert spec_write["spec"]["lora"]["r"] == 16  # the status endpoint cannot change spec


def test_printer_columns(
    kube_control_plane: ControlPlane, installed_crd: dict[str, Any], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    cp.request("POST", ftj_path(ns), example_doc())
    cp.request(
        "PATCH",
        ftj_path(ns, "support-bot") + "/status",
        {"status": {"gpuClass": "24GB", "phase": "Running"}},
        content_type="application/merge-patch+json",
    )
    table = cp.request(
        "GET",
        ftj_path(ns),
        headers={"Accept": "application/json;as=Table;v=v1beta1;g=meta.k8s.io"},
    )
    columns = [c["name"] for c in table["columnDefinitions"]]
    for name in ("Name", "Class", "Phase", "Adapter", "Age"):
        assert name in columns
    (row,) = table["rows"]
    cells = dict(zip(columns, row["cells"], strict=True))
    assert (cells["Class"], cells["Phase"]) == ("24GB", "Running")


def test_rendered_objects_pass_server_validation(
    kube_control_plane: ControlPlane, kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    spec = load_spec(EXAMPLE)
    found = bundled_config("llama-3.1-8b")
    assert found is not None
    settings = Settings(namespace=ns, s3_endpoint_url="http://s3.storage.svc:8333")
    plan = make_plan(spec, settings, model_config=found.config)
    cm, job = render_objects(spec, plan, settings)
    dry = "?" + urllib.parse.urlencode({"dryRun": "All"})
    cp.request("POST", f"/api/v1/namespaces/{ns}/configmaps{dry}", cm)
    old = copy.deepcopy(job)
    for key in NEWER_JOB_FIELDS:
        old["spec"].pop(key, None)
    got = cp.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs{dry}", old)
    pod = got["spec"]["template"]["spec"]
    assert pod["affinity"] == job["spec"]["template"]["spec"]["affinity"]
    broken = copy.deepcopy(old)
    expr = broken["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"][0]
    expr["values"] = ["22499", "44999"]  # Gt takes exactly one integer
    with pytest.raises(AssertionError, match="422"):
        cp.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs{dry}", broken)
