"""``qlora submit | status | logs | cancel`` against a real control plane: the real scheduler
places pods by GPU class, the real Job controller runs the Job, the test plays the kubelet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ExitCode
from runner.k8s import names
from runner.k8s.client import load_client
from runner.k8s.status import termination_message
from runner.k8s.submitter import Submitter
from runner.settings import Settings
from runner.spec import load_spec
from tests.fixtures.kube import ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
SPEC_8B = REPO / "examples" / "llama-3.1-8b.yaml"
SPEC_70B = REPO / "examples" / "llama-3.3-70b.yaml"
NODE_MEMORY = "nvidia.com/gpu.memory"

TOO_BIG = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: too-big}
spec:
  model: {source: hf://meta-llama/Llama-3.3-70B-Instruct@main}
  dataset: {sources: [s3://datasets/x/train.jsonl]}
  quantization: {mode: 16bit}
  training: {max_seq_length: 131072, micro_batch_size: 8, gradient_accumulation_steps: 2}
  output: {uri: s3://adapters/too-big}
"""


def qlora(
    args: list[str], kubeconfig: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in its own process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(KUBECONFIG=str(kubeconfig), QLORA_LOG_FORMAT="text")
    return subprocess.run([sys.executable, "-m", "runner", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def objects_in(cp: ControlPlane, ns: str) -> list[str]:
    found = []
    for path in (f"/apis/batch/v1/namespaces/{ns}/jobs", f"/api/v1/namespaces/{ns}/configmaps"):
        found += [i["metadata"]["name"] for i in cp.request("GET", path)["items"]
                  if i["metadata"]["name"] != "kube-root-ca.crt"]
    return found


def job_selector(name: str) -> str:
    return f"{names.LABEL_JOB}={name}"


@pytest.mark.parametrize(
    ("spec_path", "gpu_class"), [(SPEC_8B, "24GB"), (SPEC_70B, "48GB")], ids=["8b", "70b"]
)
def test_the_scheduler_binds_the_pod_to_the_smallest_class_that_fits(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str,
    spec_path: Path, gpu_class: str,
) -> None:
    """The real scheduler puts the pod on the smallest GPU class that holds the job.

    With fake 24, 48 and 80 GB nodes of equal CPU and memory, a required ``Gt`` threshold
    alone lets an 8B pod land on an idle 48 or 80 GB node (all pass the filter and score
    alike), so the rendered Job must also *prefer* nodes below the next class's threshold::

        preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          preference:
            matchExpressions:
            - {key: nvidia.com/gpu.memory, operator: Lt, values: ["<next class min_memory_mib>"]}
    """
    cp = kube_control_plane
    spec = load_spec(spec_path)
    done = Submitter(load_client(str(cp.kubeconfig)), Settings()).submit(
        spec, namespace=kube_namespace)
    pod = cp.wait_for_bound_pod(kube_namespace, job_selector(spec.metadata.name))
    assert done.plan.gpu_class.name == gpu_class
    assert pod["spec"]["nodeName"] == gpu_nodes[gpu_class]


def test_a_spec_that_fits_nothing_is_refused_before_anything_is_created(
    kube_control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    spec = tmp_path / "too-big.yaml"
    spec.write_text(TOO_BIG)
    res = qlora(["submit", str(spec), "-n", kube_namespace], kube_control_plane.kubeconfig)
    assert res.returncode == ExitCode.DOES_NOT_FIT, res.stderr
    assert "Traceback" not in res.stderr
    assert objects_in(kube_control_plane, kube_namespace) == []


def test_resubmitting_the_same_spec_changes_nothing(
    kube_control_plane: ControlPlane, kube_namespace: str
) -> None:
    first = qlora(["submit", str(SPEC_8B), "-n", kube_namespace], kube_control_plane.kubeconfig)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(" created") == 2
    before = objects_in(kube_control_plane, kube_namespace)
    again = qlora(["submit", str(SPEC_8B), "-n", kube_namespace], kube_control_plane.kubeconfig)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count(" unchanged") == 2, again.stderr
    assert again.stdout == first.stdout
    assert objects_in(kube_control_plane, kube_namespace) == before


def _play(cp: ControlPlane, ns: str, name: str, *, exit_code: int, message: str,
          fail_job_at_once: bool = False, logs: tuple[str, ...] = ()) -> threading.Thread:
    """In the background: wait for the scheduled pod, run it (writing ``logs``), end it."""

    def kubelet() -> None:
        pod = cp.wait_for_bound_pod(ns, job_selector(name), timeout_s=90)
        if fail_job_at_once:  # what podFailurePolicy FailJob does on a server that has it
            job = pod["metadata"]["labels"]["job-name"]
            cp.request("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}",
                       {"spec": {"backoffLimit": 0}}, content_type="application/merge-patch+json")
        pod_name = pod["metadata"]["name"]
        cp.play_kubelet(ns, pod_name, phase="Running")
        if logs:
            cp.kubelet.write(ns, pod_name, *logs)
            time.sleep(2)  # the submitter sees Running and starts following the log
        cp.kubelet.close(ns, pod_name)
        cp.play_kubelet(ns, pod_name, phase="Succeeded" if exit_code == 0 else "Failed",
                        exit_code=exit_code, message=message)

    t = threading.Thread(target=kubelet, daemon=True)
    t.start()
    return t


def test_submit_wait_ends_with_the_adapter_uri_and_status_logs_cancel_follow(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    uri = "s3://adapters/llama31-8b-support/runs/20261128-1000-abc123"
    kubelet = _play(cp, ns, "llama31-8b-support", exit_code=0,
                    message=termination_message(succeeded=True, adapter_uri=uri),
                    logs=("loading model", "step 1/2 loss 2.31", "step 2/2 loss 1.87"))
    res = qlora(["submit", "--wait", "--timeout", "150", str(SPEC_8B), "-n", ns], cp.kubeconfig,
                timeout=180)
    kubelet.join(timeout=5)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == uri
    assert "Succeeded" in res.stderr
    assert re.search(r"\[llama31-8b-support-\w+-\w+\] step 2/2 loss 1.87", res.stderr), res.stderr

    status = qlora(["status", "llama31-8b-support", "-n", ns], cp.kubeconfig)
    assert status.returncode == 0, status.stderr
    assert "Succeeded" in status.stdout and uri in status.stdout and "24GB" in status.stdout

    logs = qlora(["logs", "llama31-8b-support", "-n", ns], cp.kubeconfig)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == ["loading model", "step 1/2 loss 2.31",
                                        "step 2/2 loss 1.87"]

    cancel = qlora(["cancel", "llama31-8b-support", "-n", ns], cp.kubeconfig)
    assert cancel.returncode == 0, cancel.stderr
    assert "job/llama31-8b-support-" in cancel.stdout and "configmap/" in cancel.stdout
    gone = qlora(["status", "llama31-8b-support", "-n", ns], cp.kubeconfig)
    assert gone.returncode == ExitCode.KUBERNETES and "no job named" in gone.stderr


def test_logs_follow_prints_lines_as_they_come_and_ends_with_the_container(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    assert qlora(["submit", str(SPEC_8B), "-n", ns], cp.kubeconfig).returncode == 0
    pod = cp.wait_for_bound_pod(ns, job_selector("llama31-8b-support"))["metadata"]["name"]
    cp.play_kubelet(ns, pod, phase="Running")
    cp.kubelet.write(ns, pod, "step 1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env["KUBECONFIG"] = str(cp.kubeconfig)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "logs", "-f", "llama31-8b-support",
                             "-n", ns], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "step 1\n"  # printed while the container still runs
        cp.kubelet.write(ns, pod, "step 2")
        assert proc.stdout.readline() == "step 2\n"
        cp.kubelet.close(ns, pod)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert out == ""


def test_submit_wait_reports_the_failure_reason(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    msg = termination_message(succeeded=False, reason="dataset.sources[0]: no rows", exit_code=2)
    kubelet = _play(cp, ns, "llama31-8b-support", exit_code=2, message=msg,
                    fail_job_at_once=True)
    res = qlora(["submit", "--wait", "--timeout", "150", str(SPEC_8B), "-n", ns], cp.kubeconfig,
                timeout=180)
    kubelet.join(timeout=5)
    assert res.returncode == ExitCode.JOB_FAILED, res.stderr
    assert "dataset.sources[0]: no rows" in res.stderr and "exit code 2" in res.stderr
    assert "BackoffLimitExceeded" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_submit_wait_replans_after_running_out_of_gpu_memory(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    uri = "s3://adapters/llama31-8b-support/runs/second-try"

    def kubelet() -> None:
        pod = cp.wait_for_bound_pod(ns, job_selector("llama31-8b-support"), timeout_s=90)
        job = pod["metadata"]["labels"]["job-name"]
        cp.request("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}",
                   {"spec": {"backoffLimit": 0}}, content_type="application/merge-patch+json")
        cp.play_kubelet(ns, pod["metadata"]["name"], phase="Failed", exit_code=6,
                        message=termination_message(succeeded=False, exit_code=6,
                                                    reason="CUDA out of memory"))
        retry = cp.wait_for_bound_pod(ns, f"{names.LABEL_ATTEMPT}=1", timeout_s=90)
        cp.play_kubelet(ns, retry["metadata"]["name"], phase="Succeeded",
                        message=termination_message(succeeded=True, adapter_uri=uri))

    t = threading.Thread(target=kubelet, daemon=True)
    t.start()
    res = qlora(["submit", "--wait", "--no-logs", "--timeout", "170", str(SPEC_8B), "-n", ns],
                cp.kubeconfig, timeout=200)
    t.join(timeout=5)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == uri
    assert "out of GPU memory; re-planning (1 of 2)" in res.stderr
    assert re.search(r"job/llama31-8b-support-\w+-r1 created", res.stderr), res.stderr


@pytest.mark.parametrize("case", ["forbidden", "unreachable"])
def test_api_errors_exit_8_with_a_clear_message(
    kube_control_plane: ControlPlane, kube_namespace: str, case: str
) -> None:
    cp = kube_control_plane
    cfg = cp.kubeconfig_for(cp.nobody_token, "nobody")
    if case == "unreachable":
        doc: dict[str, Any] = json.loads(cfg.read_text())
        doc["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
        cfg = cfg.with_name("kubeconfig-unreachable.yaml")
        cfg.write_text(json.dumps(doc))
    res = qlora(["submit", str(SPEC_8B), "-n", kube_namespace], cfg)
    assert res.returncode == ExitCode.KUBERNETES, res.stderr
    assert "Traceback" not in res.stderr
    if case == "forbidden":
        assert "forbidden (403)" in res.stderr and "configmaps" in res.stderr
        assert f"configmap {kube_namespace}/llama31-8b-support-" in res.stderr
    else:
        assert "cannot reach the Kubernetes API at https://127.0.0.1:1" in res.stderr
    assert objects_in(cp, kube_namespace) == []
