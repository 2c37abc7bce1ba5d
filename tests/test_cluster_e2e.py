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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.fixtures.cluster import (
    DATA,
    NODE_NAME,
    OOM_STEP,
    PAUSE_IMAGE,
    SYSCTLS,
    Cluster,
    Release,
    _kubepods_cgroups,
    _read_sysctl,
    apply_ftj,
    deploy_env,
    host_state,
    job_done,
    kubectl,
    log_records,
    one_node_cluster,
    pod_manifest,
    qlora,
    render_apply,
    run_manifests,
    tiny_spec,
    wait_ftj,
    wait_job,
    wait_service_account,
)
from tests.fixtures.prometheus import PrometheusServer, Pushgateway
from tests.fixtures.s3 import SeaweedServer, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class _BodyFailedError(Exception):
    """Raised inside the cluster on purpose: teardown must still undo everything."""


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
        wait_service_account(c.cp, ns)
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


# -- the project image on the shared cluster, no operator ---------------------------------------


# The first test on the session's cluster: its timeout covers starting it (control plane,
# containerd, importing the image, kubelet; about 2 min on 2 busy cores), which --durations
# reports as this test's setup.
@pytest.mark.timeout(360)
def test_host_gets_its_sysctls_back_while_the_cluster_runs(cluster: Cluster) -> None:
    """The kubelet set vm.overcommit_memory, kernel.panic and kernel.panic_on_oops at start;
    the fixture gave them back right after."""
    for key in SYSCTLS:
        assert _read_sysctl(key) == cluster.sysctls_before[key], key


@pytest.mark.timeout(240)
def test_render_and_kubectl_apply_run_to_a_published_adapter(
    cluster: Cluster, cluster_ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    tmp_path: Path,
) -> None:
    """No operator: `qlora render SPEC | kubectl apply -f -`; the real pod trains, verifies and
    publishes to S3; `kubectl logs` shows its log."""
    ns = cluster_ns
    env = deploy_env(cluster, s3_server, ns, tmp_path)
    spec = tiny_spec(tmp_path, s3_inputs, "plain")
    rendered = qlora(env, "render", str(spec))
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
    applied = kubectl(cluster, "apply", "--validate=false", "-f", "-", stdin=rendered.stdout)
    assert applied.returncode == 0, applied.stderr
    done = wait_job(cluster, ns, job["metadata"]["name"])
    pods = cluster.cp.pods(ns, f"job-name={job['metadata']['name']}")
    assert done["status"].get("succeeded") == 1, (done["status"], [p["status"] for p in pods])
    assert pods and pods[0]["spec"]["nodeName"] == NODE_NAME
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    logs = kubectl(cluster, "logs", "-n", ns, pods[0]["metadata"]["name"])
    assert logs.returncode == 0 and "verif" in logs.stdout, logs.stderr
    manifests = run_manifests(s3_server, s3_inputs["bucket"], "adapters/plain/")
    assert len(manifests) == 1
    assert manifests[0]["training"]["steps"] == 8


@pytest.mark.timeout(300)
def test_deleting_the_running_pod_checkpoints_and_the_replacement_resumes(
    cluster: Cluster, cluster_ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    tmp_path: Path,
) -> None:
    """Preemption for real: the kubelet SIGTERMs the deleted pod, which commits a checkpoint;
    the Job's replacement pod resumes from that step; the adapter has the planned steps."""
    ns = cluster_ns
    steps = 40
    # A tiny model trains 40 steps in a few seconds on an idle machine, faster than the
    # log poll and the kubelet's SIGTERM: slow each step (fault injection, inherited by the pods).
    env = {**deploy_env(cluster, s3_server, ns, tmp_path), "QLORA_FAULT_STEP_DELAY_S": "0.5"}
    spec = tiny_spec(tmp_path, s3_inputs, "preempt", steps=steps, logging_steps=1,
                     checkpoint_every_steps=1000)
    job = render_apply(cluster, env, spec)
    selector = f"job-name={job['metadata']['name']}"

    def training_pod() -> str | None:
        for p in cluster.cp.pods(ns, selector):
            if p["status"].get("phase") != "Running":
                continue
            name = str(p["metadata"]["name"])
            if any(r.get("step", 0) >= 3 for r in log_records(cluster, ns, name)):
                return name
        return None

    first = cluster.cp.wait_for("the pod to pass step 3", training_pod, 150, 1.0)
    deleted = kubectl(cluster, "delete", "pod", "-n", ns, first, "--wait=true", timeout_s=120)
    assert deleted.returncode == 0, deleted.stderr
    done = wait_job(cluster, ns, job["metadata"]["name"], 180)
    assert done["status"].get("succeeded") == 1, done["status"]
    (second,) = [p for p in cluster.cp.pods(ns, selector)
                 if p["status"].get("phase") == "Succeeded"]
    records = log_records(cluster, ns, second["metadata"]["name"])
    resumed = [r for r in records if "resuming from checkpoint step" in r.get("msg", "")]
    assert resumed, [r.get("msg") for r in records][:40]
    # checkpoint_every_steps is far off: the only checkpoint is the SIGTERM's.
    step = resumed[0]["checkpoint_step"]
    assert 3 <= step < steps
    manifests = run_manifests(s3_server, s3_inputs["bucket"], "adapters/preempt/")
    assert len(manifests) == 1 and manifests[0]["training"]["steps"] == steps


@pytest.mark.timeout(300)
def test_submit_wait_prints_the_adapter_and_prometheus_scrapes_the_real_pod(
    cluster: Cluster, cluster_ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    pushgateway: Pushgateway, start_prometheus: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    """`qlora submit --wait` runs the spec to a published adapter and prints its URI; while
    the real pod trains, Prometheus scrapes its /metrics (host network, the spec's port);
    after the pod ends its final values are in the Pushgateway."""
    ns = cluster_ns
    port = free_port()
    env = deploy_env(cluster, s3_server, ns, tmp_path)
    steps = 30
    spec = tiny_spec(tmp_path, s3_inputs, "submitted", steps=steps, logging_steps=1,
                     metrics={"enabled": True, "port": port, "pushgateway_url": pushgateway.url})
    prom = start_prometheus([f"127.0.0.1:{port}"], pushgateway)
    binary = str(Path(sys.executable).parent / "qlora")
    with subprocess.Popen([binary, "submit", "--wait", "--timeout", "200", str(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=REPO) as submit:
        try:
            scraped = prom.wait_for(
                'qlora_train_step{job="trainer"}', lambda r: bool(r) and r[0][1] >= 1, 200)
            out, err = submit.communicate(timeout=220)
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.communicate(timeout=10)
    assert submit.returncode == 0, err[-3000:]
    uri = out.strip().splitlines()[-1]
    assert uri.startswith(f"{s3_inputs['output']}/submitted/runs/"), (out, err[-2000:])
    assert scraped[0][0]["instance"] == f"127.0.0.1:{port}"
    manifests = run_manifests(s3_server, s3_inputs["bucket"], "adapters/submitted/")
    assert len(manifests) == 1 and manifests[0]["training"]["steps"] == steps
    # The pod is gone from Prometheus' view; its last values are in the Pushgateway.
    assert pushgateway.value("qlora_job_exit_code", job="submitted", namespace=ns) == 0
    assert pushgateway.value("qlora_train_step", job="submitted", namespace=ns) == steps
    assert pushgateway.value("qlora_job_phase", job="submitted", namespace=ns,
                             phase="succeeded") == 1


# -- the chart and the operator (one release for the tests below) -------------------------------


@pytest.mark.timeout(400)
def test_helm_chart_operator_runs_a_finetunejob_to_a_verified_adapter(
    cluster: Cluster, operator_release: Release, s3_inputs: dict[str, str], tmp_path: Path,
) -> None:
    """`helm install` (the operator pod from the image becomes Ready through its /readyz
    probe); a FineTuneJob gives a Job whose real pod trains, verifies and publishes; the
    FineTuneJob is Succeeded with its adapterURI, which `qlora verify` accepts; `qlora status`
    and `qlora logs` show the real pod."""
    rel = operator_release
    op = cluster.cp.pods(rel.ns, "app.kubernetes.io/component=operator")
    probes = op[0]["spec"]["containers"][0]
    # Under hostNetwork the replicas bind the first free port, so the probes are exec probes
    # that ask the pod's own endpoint (the chart's httpGet probes are for pod networking).
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        action = probes[probe].get("httpGet") or probes[probe]["exec"]
        assert path in json.dumps(action), (probe, action)
    assert op[0]["status"]["phase"] == "Running" and all(
        c["ready"] for c in op[0]["status"]["containerStatuses"]), op[0]["status"]
    name = apply_ftj(cluster, rel, tiny_spec(tmp_path, s3_inputs, "viahelm"))
    status = wait_ftj(cluster, rel.ns, name)
    assert status["phase"] == "Succeeded", status
    assert status.get("retries", 0) == 0, status
    uri = status["adapterURI"]
    assert uri.startswith(f"{s3_inputs['output']}/viahelm/runs/"), uri
    pods = cluster.cp.pods(rel.ns, f"qlora-runner.io/job={name}")
    assert pods and pods[0]["status"]["phase"] == "Succeeded"
    assert pods[0]["spec"]["nodeName"] == NODE_NAME

    verify = qlora(rel.env, "verify", uri)
    assert verify.returncode == 0, verify.stderr
    st = qlora(rel.env, "status", name, "--namespace", rel.ns)
    assert st.returncode == 0 and "Succeeded" in st.stdout, (st.stdout, st.stderr)
    # The Job, its phase and the node the real pod ran on.
    assert status["jobName"] in st.stdout and NODE_NAME in st.stdout, st.stdout
    logs = qlora(rel.env, "logs", name, "--namespace", rel.ns)
    pod_log = kubectl(cluster, "logs", "-n", rel.ns, pods[0]["metadata"]["name"])
    assert logs.returncode == 0, logs.stderr
    last = pod_log.stdout.strip().splitlines()[-1]
    assert last and last in logs.stdout


@pytest.mark.timeout(240)
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
    name = apply_ftj(cluster, rel, tiny_spec(tmp_path, inputs, "badrow"))
    status = wait_ftj(cluster, rel.ns, name)
    assert status["phase"] == "Failed", status
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "PodFailurePolicy" and "exit code 2" in failed["message"], failed
    job_name = status["jobName"]
    job = cluster.cp.wait_for("the Job to be failed",
                              lambda: job_done(cluster, rel.ns, job_name), 60)
    assert job["status"].get("failed", 0) < 1 + 3, job["status"]
    assert {c["type"]: c for c in job["status"]["conditions"]}["Failed"]["reason"] \
        == "DeadlineExceeded", job["status"]
    pods = cluster.cp.pods(rel.ns, f"job-name={job_name}")
    codes = [p["status"].get("containerStatuses", [{}])[0].get("state", {})
             .get("terminated", {}).get("exitCode") for p in pods]
    # One pod exited 2; the Job controller may have started its replacement before the
    # operator's stop, which the deadline ends before it exits with a code of its own.
    assert codes.count(2) == 1 and len(pods) <= 2, codes
    time.sleep(12)  # the Job controller's first retry backoff is 10 s: no new pod comes
    # (the deadline deletes the replacement pod, if there was one)
    after = {p["metadata"]["name"] for p in cluster.cp.pods(rel.ns, f"job-name={job_name}")}
    assert after <= {p["metadata"]["name"] for p in pods}, after


@pytest.mark.timeout(360)
def test_an_out_of_memory_exit_replans_and_the_new_job_resumes(
    cluster: Cluster, operator_release: Release, s3_server: SeaweedServer,
    s3_inputs: dict[str, str], tmp_path: Path,
) -> None:
    """The release's fault injection raises PyTorch's out-of-memory error at the end of step
    OOM_STEP of attempt 0: that pod exits 6, the operator re-plans (half the micro batch,
    twice the accumulation) into a new Job (attempt 1), whose pod resumes from the last
    checkpoint and publishes an adapter of exactly the planned steps."""
    rel = operator_release
    steps, every = 16, 4
    name = apply_ftj(cluster, rel, tiny_spec(tmp_path, s3_inputs, "oomed", steps=steps,
                                             checkpoint_every_steps=every))
    status = wait_ftj(cluster, rel.ns, name, timeout_s=300)
    assert status["phase"] == "Succeeded" and status["retries"] == 1, status
    planned = {c["type"]: c for c in status["conditions"]}["Planned"]
    assert planned["reason"] == "Replanned" and "micro batch 4 x 2" in planned["message"], planned
    # The operator re-plans only on exit code 6 (reason OutOfMemory); the attempt-0 Job and
    # its pod are deleted as outdated at once, the attempt-1 pod stays for its log.
    op_log = kubectl(cluster, "logs", "-n", rel.ns, "-l", "app.kubernetes.io/component=operator",
                     "--tail=-1").stdout
    assert f"finetunejob {rel.ns}/{name}: Planned (OutOfMemory)" in op_log, op_log[-3000:]
    (second,) = [p["metadata"]["name"] for p in
                 cluster.cp.pods(rel.ns, f"qlora-runner.io/job={name}")
                 if p["metadata"]["labels"].get("qlora-runner.io/attempt") == "1"]
    records = log_records(cluster, rel.ns, second)
    resumed = [r for r in records if "resuming from checkpoint step" in r.get("msg", "")]
    # The last scheduled checkpoint before the OOM, or a later step: Kubernetes 1.20 has no
    # podFailurePolicy, so the Job controller may start a replacement attempt-0 pod before the
    # operator deletes that Job; it resumes from the same checkpoint, and the deletion's SIGTERM
    # makes it commit the step it reached (a preemption checkpoint), which attempt 1 resumes.
    first = OOM_STEP // every * every
    assert resumed and first <= resumed[0]["checkpoint_step"] < OOM_STEP, \
        [r.get("msg") for r in records][:40]
    manifests = run_manifests(s3_server, s3_inputs["bucket"], "adapters/oomed/")
    assert len(manifests) == 1 and manifests[0]["training"]["steps"] == steps
