"""End to end on a real one-node cluster (tests/fixtures/cluster.py): the image built in this
CI run (``QLORA_TEST_IMAGE``), real containers started by a real kubelet, S3 on 127.0.0.1.

The first test starts a cluster of its own (no project image), makes it fail on purpose and
checks that the host is as before; the others share the session's cluster. Each test has its
own namespace and time bound, and the session fixture checks the host again at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, require_binary
from tests.fixtures.cluster import (
    NODE_NAME,
    PAUSE_IMAGE,
    SYSCTLS,
    Cluster,
    _kubepods_cgroups,
    _read_sysctl,
    host_state,
    one_node_cluster,
    pod_manifest,
)
from tests.fixtures.kube import BIN_ENV, ControlPlane
from tests.fixtures.prometheus import PrometheusServer, Pushgateway
from tests.fixtures.s3 import SeaweedServer, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DATA = REPO / "examples" / "data" / "antonyms-chat.jsonl"
SECRET_NAME = "qlora-s3"


class _BodyFailedError(Exception):
    """Raised inside the cluster on purpose: teardown must still undo everything."""


def _wait_service_account(cp: ControlPlane, ns: str) -> None:
    cp.wait_for(f"ServiceAccount default in {ns}", lambda: cp.request(
        "GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default", ok_missing=True), 30)


@pytest.mark.timeout(240)
def test_node_runs_a_pod_and_teardown_restores_the_host(tmp_path: Path) -> None:
    """Node Ready with GPU capacity and labels; a pause-image pod runs; a failing body still
    leaves no sysctl, mount, cgroup or directory behind."""
    before = host_state()
    seen: dict[str, Any] = {}
    with pytest.raises(_BodyFailedError), one_node_cluster(tmp_path / "c", image=None) as c:
        node = c.cp.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        seen["allocatable"] = node["status"]["allocatable"]
        seen["labels"] = node["metadata"]["labels"]
        seen["taints"] = node["spec"].get("taints", [])
        seen["address"] = node["status"]["addresses"]
        ns = c.cp.create_namespace("node")
        _wait_service_account(c.cp, ns)
        c.cp.request("POST", f"/api/v1/namespaces/{ns}/pods",
                     pod_manifest("sleeper", PAUSE_IMAGE, ["/pause"]))
        c.cp.wait_for("the pause pod Running", lambda: c.pod_phase(ns, "sleeper") == "Running",
                      60)
        seen["cgroups"] = len(_kubepods_cgroups())
        seen["mounts"] = len(host_state(c.scratch).mounts)
        seen["sysctls"] = {k: _read_sysctl(k) for k in SYSCTLS}
        raise _BodyFailedError
    assert seen["allocatable"]["nvidia.com/gpu"] == "1"
    assert seen["labels"]["nvidia.com/gpu.memory"] == "23028"
    assert seen["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A10G"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in seen["taints"]
    assert {"type": "InternalIP", "address": "127.0.0.1"} in seen["address"]
    # The kubelet really changed the host (so the check below means something) ...
    assert seen["cgroups"] > 0 and seen["mounts"] > 0
    # ... its sysctls were given back while it ran, and everything is undone after.
    assert seen["sysctls"] == before.sysctls
    assert host_state() == before


# -- the project image on the shared cluster ---------------------------------------------------


def _kubectl(c: Cluster, *args: str, stdin: str | None = None,
             timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    kubectl = require_binary("kubectl", env_dir=BIN_ENV)
    return subprocess.run([kubectl, f"--kubeconfig={c.kubeconfig}", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout_s)


def _qlora(env: dict[str, str], *args: str, stdin: str | None = None,
           timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    qlora = str(Path(sys.executable).parent / "qlora")
    return subprocess.run([qlora, *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout_s, cwd=REPO)


@pytest.fixture()
def ns(cluster: Cluster) -> str:
    name = cluster.cp.create_namespace("e2e")
    _wait_service_account(cluster.cp, name)
    return name


@pytest.fixture()
def s3_inputs(s3_server: SeaweedServer, tiny_model_dir: Path) -> dict[str, str]:
    """A bucket with the tiny model and the antonyms data; returns the URIs."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    for f in tiny_model_dir.iterdir():
        client.put_object(Bucket=bucket, Key=f"models/tiny/{f.name}", Body=f.read_bytes())
    client.put_object(Bucket=bucket, Key="data/antonyms.jsonl", Body=DATA.read_bytes())
    return {"bucket": bucket, "model": f"s3://{bucket}/models/tiny",
            "data": f"s3://{bucket}/data/antonyms.jsonl", "output": f"s3://{bucket}/adapters"}


def _spec(tmp_path: Path, inputs: dict[str, str], name: str, *, steps: int = 8,
          metrics: dict[str, Any] | None = None, **training: Any) -> Path:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    doc["metadata"]["name"] = name
    body = doc["spec"]
    if metrics is not None:
        body["metrics"] = metrics
    # A few steps of a random tiny model need not beat the base model: these tests are
    # about the cluster, and the held-out evaluation would double each pod's time.
    body["evaluation"] = {"enabled": False}
    body["model"]["source"] = inputs["model"]
    body["dataset"]["sources"] = [inputs["data"]]
    body["training"]["max_steps"] = steps
    body["training"].update(training)
    body["output"]["uri"] = f"{inputs['output']}/{name}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _classes_file(tmp_path: Path) -> Path:
    """The bundled class table with one CPU core per job: the node has two."""
    doc = yaml.safe_load((REPO / "runner" / "data" / "gpu_classes.yaml").read_text())
    for cls in doc["classes"]:
        cls["cpu_cores"] = 1
    path = tmp_path / "gpu_classes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _deploy_env(c: Cluster, s3: SeaweedServer, ns: str, tmp_path: Path) -> dict[str, str]:
    """What a platform team sets for qlora render/submit against this cluster, and the
    S3 Secret its pods read."""
    c.cp.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "metadata": {"name": SECRET_NAME},
        "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key,
                       "AWS_SECRET_ACCESS_KEY": s3.secret_key},
    })
    assert c.image
    return s3.subprocess_env(
        KUBECONFIG=str(c.kubeconfig),
        QLORA_IMAGE=c.image,
        QLORA_NAMESPACE=ns,
        QLORA_HOST_NETWORK="true",
        QLORA_S3_SECRET_NAME=SECRET_NAME,
        QLORA_GPU_CLASSES_FILE=str(_classes_file(tmp_path)),
        QLORA_WORK_DIR=str(tmp_path / "work"),
        HF_HUB_OFFLINE="1",
    )


def _job_done(c: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    job = c.cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}", ok_missing=True)
    if job is None:
        return None
    for cond in job.get("status", {}).get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return dict(job)
    return None


def _wait_job(c: Cluster, ns: str, name: str, timeout_s: float = 180) -> dict[str, Any]:
    try:
        return dict(c.cp.wait_for(f"Job {ns}/{name} to finish",
                                  lambda: _job_done(c, ns, name), timeout_s, 1.0))
    except AssertionError as e:
        pods = [(p["metadata"]["name"], p["status"]) for p in c.cp.pods(ns)]
        raise AssertionError(f"{e}; pods: {json.dumps(pods)[:3000]}; "
                             f"kubelet: {c.log_tail('kubelet', 2000)}") from e


def _manifests(s3: SeaweedServer, bucket: str, prefix: str) -> list[dict[str, Any]]:
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)
            .get("Contents", [])]
    return [json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read())
            for k in keys if k.endswith("/manifest.json") and "/runs/" in k]


@pytest.mark.timeout(300)
def test_render_and_kubectl_apply_run_to_a_published_adapter(
    cluster: Cluster, ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    tmp_path: Path,
) -> None:
    """No operator: `qlora render SPEC | kubectl apply -f -`; the real pod trains, verifies and
    publishes to S3; `kubectl logs` shows its log."""
    env = _deploy_env(cluster, s3_server, ns, tmp_path)
    spec = _spec(tmp_path, s3_inputs, "plain")
    rendered = _qlora(env, "render", str(spec))
    assert rendered.returncode == 0, rendered.stderr
    objs = list(yaml.safe_load_all(rendered.stdout))
    job = next(o for o in objs if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    # Rendered as for a GPU node, unchanged: GPU limit, affinity, toleration, non-root.
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["affinity"]["nodeAffinity"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["hostNetwork"] is True
    # A 1.20 API server does not know podFailurePolicy (kubectl's schema check refuses it);
    # the rendered policy is checked against the 1.30+ schema in test_manifests_validate.
    applied = _kubectl(cluster, "apply", "--validate=false", "-f", "-", stdin=rendered.stdout)
    assert applied.returncode == 0, applied.stderr
    done = _wait_job(cluster, ns, job["metadata"]["name"])
    pods = cluster.cp.pods(ns, f"job-name={job['metadata']['name']}")
    assert done["status"].get("succeeded") == 1, (done["status"], [p["status"] for p in pods])
    assert pods and pods[0]["spec"]["nodeName"] == NODE_NAME
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    logs = _kubectl(cluster, "logs", "-n", ns, pods[0]["metadata"]["name"])
    assert logs.returncode == 0 and "verif" in logs.stdout, logs.stderr
    manifests = _manifests(s3_server, s3_inputs["bucket"], "adapters/plain/")
    assert len(manifests) == 1
    assert manifests[0]["training"]["steps"] == 8


@pytest.mark.timeout(60)
def test_host_gets_its_sysctls_back_while_the_cluster_runs(cluster: Cluster) -> None:
    """The kubelet set vm.overcommit_memory, kernel.panic and kernel.panic_on_oops at start;
    the fixture gave them back right after."""
    for key in SYSCTLS:
        assert _read_sysctl(key) == cluster.sysctls_before[key], key


def _helm(c: Cluster, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    helm = require_binary("helm")
    return subprocess.run([helm, f"--kubeconfig={c.kubeconfig}", *args], capture_output=True,
                          text=True, timeout=timeout_s)


def _ftj(c: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(c.cp.request(
        "GET", f"/apis/qlora-runner.io/v1alpha1/namespaces/{ns}/finetunejobs/{name}"))


@dataclass
class Release:
    """The chart installed in its own namespace, with the environment of `qlora` commands."""

    ns: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def operator_release(
    cluster: Cluster, s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    """`helm install` of the chart; the operator pod from the image must become Ready."""
    tmp = tmp_path_factory.mktemp("release")
    ns = cluster.cp.create_namespace("helm")
    _wait_service_account(cluster.cp, ns)
    env = _deploy_env(cluster, s3_server, ns, tmp)
    assert cluster.image
    repo, tag = cluster.image.rsplit(":", 1)
    api_port = cluster.cp.url.rsplit(":", 1)[1]
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "operator": {
            "hostNetwork": True, "port": free_port(), "bindAddress": "127.0.0.1",
            "resyncSeconds": 5,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            # No kube-proxy on this node: the in-cluster client goes to the API server on
            # the node's loopback, where a hostNetwork pod reaches it.
            "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                         {"name": "KUBERNETES_SERVICE_PORT", "value": api_port}],
        },
        "jobs": {"hostNetwork": True},
        "s3": {"endpointUrl": s3_server.endpoint_url, "secretName": SECRET_NAME},
        "gpuClasses": yaml.safe_load(_classes_file(tmp).read_text()),
    }
    values_file = tmp / "values.yaml"
    values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    chart = str(REPO / "helm" / "qlora-runner")
    out = _helm(cluster, "install", "ft", chart, "--namespace", ns, "-f", str(values_file))
    assert out.returncode == 0, out.stderr
    try:
        def operator_ready() -> bool:
            for p in cluster.cp.pods(ns, "app.kubernetes.io/name=qlora-runner"):
                if p["metadata"]["labels"].get("app.kubernetes.io/component") == "trainer":
                    continue
                conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
                if conds.get("Ready") == "True":
                    return True
            return False

        try:
            cluster.cp.wait_for("the operator pod Ready", operator_ready, 150, 1.0)
        except AssertionError as e:
            pods = [(p["metadata"]["name"], p["status"]) for p in cluster.cp.pods(ns)]
            logs = [_kubectl(cluster, "logs", "-n", ns, str(p[0]), "--tail=30").stdout
                    for p in pods]
            raise AssertionError(f"{e}: {json.dumps(pods)[:3000]}; operator log: "
                                 f"{logs!r:.6000}") from e
        yield Release(ns=ns, env=env)
    finally:
        _helm(cluster, "uninstall", "ft", "--namespace", ns)


def _apply_ftj(c: Cluster, rel: Release, spec: Path) -> str:
    doc = yaml.safe_load(spec.read_text())
    doc["metadata"]["namespace"] = rel.ns
    applied = _kubectl(c, "apply", "-f", "-", stdin=yaml.safe_dump(doc))
    assert applied.returncode == 0, applied.stderr
    return str(doc["metadata"]["name"])


def _wait_ftj(c: Cluster, ns: str, name: str, timeout_s: float = 240) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        st = _ftj(c, ns, name).get("status") or {}
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    try:
        return dict(c.cp.wait_for(f"FineTuneJob {name} to finish", finished, timeout_s, 1.0))
    except AssertionError as e:
        pods = [(p["metadata"]["name"], p["status"]) for p in c.cp.pods(ns)]
        raise AssertionError(f"{e}: {_ftj(c, ns, name).get('status')}; "
                             f"{json.dumps(pods)[:3000]}") from e


@pytest.mark.timeout(480)
def test_helm_chart_operator_runs_a_finetunejob_to_a_verified_adapter(
    cluster: Cluster, operator_release: Release, s3_inputs: dict[str, str], tmp_path: Path,
) -> None:
    """A FineTuneJob gives a Job whose real pod trains, verifies and publishes; the
    FineTuneJob is Succeeded with its adapterURI, which `qlora verify` accepts; `qlora status`
    and `qlora logs` show the real pod."""
    rel = operator_release
    name = _apply_ftj(cluster, rel, _spec(tmp_path, s3_inputs, "viahelm"))
    status = _wait_ftj(cluster, rel.ns, name)
    assert status["phase"] == "Succeeded", status
    uri = status["adapterURI"]
    assert uri.startswith(f"{s3_inputs['output']}/viahelm/runs/"), uri
    pods = cluster.cp.pods(rel.ns, f"qlora-runner.io/job={name}")
    assert pods and pods[0]["status"]["phase"] == "Succeeded"
    assert pods[0]["spec"]["nodeName"] == NODE_NAME

    verify = _qlora(rel.env, "verify", uri)
    assert verify.returncode == 0, verify.stderr
    st = _qlora(rel.env, "status", name, "--namespace", rel.ns)
    assert st.returncode == 0 and "Succeeded" in st.stdout, (st.stdout, st.stderr)
    assert pods[0]["metadata"]["name"] in st.stdout, st.stdout
    logs = _qlora(rel.env, "logs", name, "--namespace", rel.ns)
    pod_log = _kubectl(cluster, "logs", "-n", rel.ns, pods[0]["metadata"]["name"])
    assert logs.returncode == 0, logs.stderr
    last = pod_log.stdout.strip().splitlines()[-1]
    assert last and last in logs.stdout


@pytest.mark.timeout(300)
def test_a_bad_spec_fails_the_finetunejob_without_using_up_retries(
    cluster: Cluster, operator_release: Release, s3_server: SeaweedServer,
    s3_inputs: dict[str, str], tmp_path: Path,
) -> None:
    """The pod exits 2 (a malformed row). 1.20 drops the rendered podFailurePolicy, so the
    operator applies it: the FineTuneJob fails with the pod's reason and the Job is stopped
    after that one pod instead of running it backoffLimit (3) more times."""
    rel = operator_release
    bad = DATA.read_text().splitlines()
    bad[2] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    s3_server.client().put_object(Bucket=s3_inputs["bucket"], Key="data/bad.jsonl",
                                  Body=("\n".join(bad) + "\n").encode())
    inputs = {**s3_inputs, "data": f"s3://{s3_inputs['bucket']}/data/bad.jsonl"}
    name = _apply_ftj(cluster, rel, _spec(tmp_path, inputs, "badrow"))
    status = _wait_ftj(cluster, rel.ns, name)
    assert status["phase"] == "Failed", status
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "PodFailurePolicy" and "exit code 2" in failed["message"], failed
    job_name = status["jobName"]
    job = cluster.cp.wait_for("the Job to be failed", lambda: _job_done(cluster, rel.ns,
                                                                         job_name), 60)
    assert job["status"].get("failed", 0) < 1 + 3, job["status"]
    pods = cluster.cp.pods(rel.ns, f"job-name={job_name}")
    codes = [p["status"]["containerStatuses"][0]["state"].get("terminated", {}).get("exitCode")
             for p in pods]
    assert codes and set(codes) == {2}, codes
    time.sleep(12)  # the Job controller's first retry backoff is 10 s: no new pod comes
    assert len(cluster.cp.pods(rel.ns, f"job-name={job_name}")) == len(pods)


def _render_apply(c: Cluster, env: dict[str, str], spec: Path) -> dict[str, Any]:
    """`qlora render SPEC | kubectl apply -f -`; returns the rendered Job."""
    rendered = _qlora(env, "render", str(spec))
    assert rendered.returncode == 0, rendered.stderr
    # kubectl 1.20 does not know podFailurePolicy (nor podReplacementPolicy): without
    # --validate=false its client-side schema check refuses them; the server drops them.
    applied = _kubectl(c, "apply", "--validate=false", "-f", "-", stdin=rendered.stdout)
    assert applied.returncode == 0, applied.stderr
    return next(o for o in yaml.safe_load_all(rendered.stdout) if o["kind"] == "Job")


def _log_records(c: Cluster, ns: str, pod: str) -> list[dict[str, Any]]:
    out = _kubectl(c, "logs", "-n", ns, pod)
    records = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


@pytest.mark.timeout(360)
def test_deleting_the_running_pod_checkpoints_and_the_replacement_resumes(
    cluster: Cluster, ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    tmp_path: Path,
) -> None:
    """Preemption for real: the kubelet SIGTERMs the deleted pod, which commits a checkpoint;
    the Job's replacement pod resumes from that step; the adapter has the planned steps."""
    steps = 60
    env = _deploy_env(cluster, s3_server, ns, tmp_path)
    spec = _spec(tmp_path, s3_inputs, "preempt", steps=steps, logging_steps=1)
    job = _render_apply(cluster, env, spec)
    selector = f"job-name={job['metadata']['name']}"

    def training_pod() -> str | None:
        for p in cluster.cp.pods(ns, selector):
            if p["status"].get("phase") != "Running":
                continue
            name = str(p["metadata"]["name"])
            if any(r.get("step", 0) >= 3 for r in _log_records(cluster, ns, name)):
                return name
        return None

    first = cluster.cp.wait_for("the pod to pass step 3", training_pod, 180, 1.0)
    deleted = _kubectl(cluster, "delete", "pod", "-n", ns, first, "--wait=true",
                       timeout_s=120)
    assert deleted.returncode == 0, deleted.stderr
    done = _wait_job(cluster, ns, job["metadata"]["name"], 240)
    assert done["status"].get("succeeded") == 1, done["status"]
    (second,) = [p for p in cluster.cp.pods(ns, selector)
                 if p["status"].get("phase") == "Succeeded"]
    records = _log_records(cluster, ns, second["metadata"]["name"])
    resumed = [r for r in records if "resuming from checkpoint step" in r.get("msg", "")]
    assert resumed, [r.get("msg") for r in records][:40]
    step = resumed[0]["checkpoint_step"]
    assert 3 <= step < steps
    manifests = _manifests(s3_server, s3_inputs["bucket"], "adapters/preempt/")
    assert len(manifests) == 1 and manifests[0]["training"]["steps"] == steps


@pytest.mark.timeout(360)
def test_submit_wait_prints_the_adapter_and_prometheus_scrapes_the_real_pod(
    cluster: Cluster, ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    pushgateway: Pushgateway, start_prometheus: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    """`qlora submit --wait` runs the spec to a published adapter and prints its URI; while
    the real pod trains, Prometheus scrapes its /metrics (host network, the spec's port);
    after the pod ends its final values are in the Pushgateway."""
    port = free_port()
    env = _deploy_env(cluster, s3_server, ns, tmp_path)
    spec = _spec(tmp_path, s3_inputs, "submitted", steps=40, logging_steps=1,
                 metrics={"enabled": True, "port": port, "pushgateway_url": pushgateway.url})
    prom = start_prometheus([f"127.0.0.1:{port}"], pushgateway)
    qlora = str(Path(sys.executable).parent / "qlora")
    with subprocess.Popen([qlora, "submit", "--wait", "--timeout", "240", str(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=REPO) as submit:
        try:
            scraped = prom.wait_for(
                'qlora_train_step{job="trainer"}', lambda r: bool(r) and r[0][1] >= 1, 240)
            out, err = submit.communicate(timeout=270)
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.communicate(timeout=10)
    assert submit.returncode == 0, err[-3000:]
    uri = out.strip().splitlines()[-1]
    assert uri.startswith(f"{s3_inputs['output']}/submitted/runs/"), (out, err[-2000:])
    assert scraped[0][0]["instance"] == f"127.0.0.1:{port}"
    manifests = _manifests(s3_server, s3_inputs["bucket"], "adapters/submitted/")
    assert len(manifests) == 1 and manifests[0]["training"]["steps"] == 40
    # The pod is gone from Prometheus' view; its last values are in the Pushgateway.
    assert pushgateway.value("qlora_job_exit_code", job="submitted", namespace=ns) == 0
    assert pushgateway.value("qlora_train_step", job="submitted", namespace=ns) == 40
    assert pushgateway.value("qlora_job_phase", job="submitted", namespace=ns,
                             phase="succeeded") == 1
