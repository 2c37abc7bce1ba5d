"""Two pods of one data-parallel job on the real one-node cluster (tests/fixtures/cluster.py),
training together from the image.

``qlora render`` of a spec with ``resources.nodes: 2`` gives a ConfigMap, a headless Service
and an Indexed Job. The control plane here is Kubernetes 1.20, older than Indexed Jobs (it
drops ``completionMode`` and gives the pods no index), and has no cluster DNS, so the test
makes the Job's two pods itself from the rendered pod template, each with what the 1.21+ Job
controller and the headless Service would give it: ``JOB_COMPLETION_INDEX`` 0 / 1, and the
master at 127.0.0.1 (both pods use the host network; the rendered objects are schema-checked
for 1.30+ in tests/test_ddp_plan_render.py). The node has one ``nvidia.com/gpu`` and the
runner trains on the CPU, so the GPU request is dropped; the metrics server is off, since two
host-network pods would both bind its port. Everything else is the rendered pod: the image's
entrypoint, the mounted spec and plan, the S3 Secret, non-root, read-only root filesystem.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cluster import (
    Cluster,
    deploy_env,
    kubectl,
    log_records,
    pod_summary,
    qlora,
    run_manifests,
    tiny_spec,
)
from tests.fixtures.s3 import SeaweedServer, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(400)]


def node_pod(job: dict[str, Any], index: int, master_port: int) -> dict[str, Any]:
    """Pod ``index`` of the rendered Indexed Job, as the Job controller would make it."""
    template = copy.deepcopy(job["spec"]["template"])
    name = f"{job['metadata']['name']}-{index}"
    spec = template["spec"]
    spec.pop("subdomain", None)  # no cluster DNS here: the master is 127.0.0.1
    spec["hostname"] = name
    train = spec["containers"][0]
    for part in ("limits", "requests"):
        train["resources"][part].pop("nvidia.com/gpu", None)
    train["env"] = [e for e in train["env"]
                    if e["name"] not in ("QLORA_MASTER_ADDR", "QLORA_MASTER_PORT")]
    train["env"] += [
        {"name": "JOB_COMPLETION_INDEX", "value": str(index)},
        {"name": "QLORA_MASTER_ADDR", "value": "127.0.0.1"},
        {"name": "QLORA_MASTER_PORT", "value": str(master_port)},
    ]
    train.pop("ports", None)
    meta = {"name": name, "namespace": job["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def test_two_pods_train_one_adapter_together_from_the_image(
    cluster: Cluster, cluster_ns: str, s3_server: SeaweedServer, s3_inputs: dict[str, str],
    tmp_path: Path,
) -> None:
    ns = cluster_ns
    env = deploy_env(cluster, s3_server, ns, tmp_path)
    path = tiny_spec(tmp_path, s3_inputs, "ddp", steps=2, metrics={"enabled": False},
                     micro_batch_size=4, gradient_accumulation_steps=1,
                     target_effective_batch_size=8)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["spec"]["resources"] = {"nodes": 2}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    rendered = qlora(env, "render", str(path))
    assert rendered.returncode == 0, rendered.stderr
    objs = list(yaml.safe_load_all(rendered.stdout))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
    config_map, job = objs[0], objs[2]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2

    port = free_port()
    pods = [node_pod(job, i, port) for i in (0, 1)]
    applied = kubectl(cluster, "apply", "-f", "-",
                      stdin=yaml.safe_dump_all([config_map, *pods]))
    assert applied.returncode == 0, applied.stderr

    def finished() -> list[str] | None:
        phases = [cluster.pod_phase(ns, p["metadata"]["name"]) for p in pods]
        return phases if all(ph in ("Succeeded", "Failed") for ph in phases) else None

    try:
        phases = cluster.cp.wait_for("both pods to finish", finished, timeout_s=300,
                                     every_s=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}; pods: {pod_summary(cluster, ns)}") from e
    recs = [log_records(cluster, ns, p["metadata"]["name"]) for p in pods]
    assert phases == ["Succeeded", "Succeeded"], (phases, [r[-5:] for r in recs])
    done = [r for rs in recs for r in rs if str(r.get("msg", "")).startswith("training done")]
    assert sorted(r["rank"] for r in done) == [0, 1]
    assert {r["world_size"] for r in done} == {2}
    assert len({r["lora_sha256"] for r in done}) == 1
    manifests = run_manifests(s3_server, s3_inputs["bucket"], "adapters/ddp/")
    assert len(manifests) == 1  # only index 0 published
    assert manifests[0]["training"]["steps"] == 2
