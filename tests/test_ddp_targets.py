"""The optional multi-node targets: a JobSet and a Kubeflow Trainer TrainJob from the same plan.

Pure code, milliseconds. Each rendered object is checked against our schema of the fields we
emit (:mod:`tests.crd_schemas`, written from the projects' API types) with the Kubernetes types
inside resolved for 1.30 and the newest release; the mutation cases show that a misspelt or
misplaced field fails that check.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from runner.errors import SpecError
from runner.k8s import jobset, names, render_objects
from runner.launch import Layout, torchrun_command
from runner.plan import bundled_config, make_plan
from runner.settings import Settings
from runner.spec import validate_document
from tests.crd_schemas import validate_crd

REPO = Path(__file__).resolve().parent.parent
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def settings(target: str) -> Settings:
    return Settings(
        s3_endpoint_url="http://s3.storage.svc:8333",
        pushgateway_url=None,
        multi_node_target=target,  # type: ignore[arg-type]
    )


def render(target: str, queue: str | None = "gpu", **resources: Any) -> list[dict[str, Any]]:
    doc = yaml.safe_load((REPO / "examples" / "llama-3.1-8b.yaml").read_text(encoding="utf-8"))
    doc["spec"].setdefault("resources", {}).update(resources)
    doc["spec"]["training"]["max_steps"] = 4000
    spec = validate_document(doc, "8b.yaml")
    found = bundled_config("llama-3.1-8b")
    assert found is not None
    s = settings(target)
    return render_objects(spec, make_plan(spec, s, model_config=found.config), s,
                          queue_name=queue)


def check(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        validate_crd(obj, version)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_jobset_wraps_the_indexed_job_with_gang_restart() -> None:
    objects = render("jobset", nodes=2, gpus_per_node=2)
    # The JobSet controller makes the headless Service itself.
    assert [o["kind"] for o in objects] == ["ConfigMap", "JobSet"]
    js = objects[1]
    check(js)
    name, spec = js["metadata"]["name"], js["spec"]
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert spec["suspend"] is True  # Kueue admits the whole set as one workload
    assert spec["network"] == {
        "enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True,
    }  # fmt: skip
    assert spec["successPolicy"]["operator"] == "All"
    fp = spec["failurePolicy"]
    assert fp["restartStrategy"] == "Recreate" and fp["maxRestarts"] == 3
    assert fp["rules"][0]["action"] == "FailJobSet"
    assert "PodFailurePolicy" in fp["rules"][0]["onJobFailureReasons"]
    (rj,) = spec["replicatedJobs"]
    job = rj["template"]["spec"]
    assert rj["replicas"] == 1
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 2, 2)
    assert job["backoffLimit"] == 0 and "suspend" not in job
    pod = job["template"]["spec"]
    assert "subdomain" not in pod
    train = pod["containers"][0]
    assert env_of(train)["QLORA_MASTER_ADDR"] == f"{name}-node-0-0.{name}.qlora.svc"
    assert train["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # The Job inside is a plain batch/v1 Job template, also valid as a Job of its own.
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": job},
            version,
            strict=True,
        )


def test_trainjob_runs_on_the_torch_runtime_with_our_pod() -> None:
    objects = render("trainjob", nodes=2, gpus_per_node=2)
    assert [o["kind"] for o in objects] == ["ConfigMap", "TrainJob"]
    tj = objects[1]
    check(tj)
    spec = tj["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }  # fmt: skip
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)
    assert trainer["command"] == ["qlora", "run"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    env = env_of(trainer)
    assert not [k for k in env if k.startswith("PET_")]  # the runtime's, refused if we set them
    assert "QLORA_MASTER_ADDR" not in env  # PET_MASTER_ADDR comes from the runtime
    assert env["QLORA_PLAN"] == "/etc/qlora/plan.json"
    assert spec["suspend"] is True and spec["activeDeadlineSeconds"] >= 7200
    (patch,) = spec["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    pod = rj["template"]["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} >= {"config", "dshm", "cache", "work", "tmp"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {"mountPath": "/etc/qlora", "name": "config", "readOnly": True} in container[
        "volumeMounts"
    ]
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for e in expr["nodeSelectorTerms"][0]["matchExpressions"]}
    assert "nvidia.com/gpu.count" in keys


def test_one_node_ignores_the_multi_node_target() -> None:
    for target in ("jobset", "trainjob"):
        assert [o["kind"] for o in render(target, gpus_per_node=2)] == ["ConfigMap", "Job"]


def _rename(obj: dict[str, Any], path: list[str | int], new: str) -> None:
    *parent, key = path
    node: Any = obj
    for p in parent:
        node = node[p]
    node[new] = node.pop(key)


def _move(obj: dict[str, Any], path: list[str | int], to: list[str | int]) -> None:
    *parent, key = path
    node: Any = obj
    for p in parent:
        node = node[p]
    value = node.pop(key)
    dest: Any = obj
    for p in to:
        dest = dest[p]
    dest[key] = value


RJ_POD = ["spec", "replicatedJobs", 0, "template", "spec", "template", "spec"]
TJ_POD = ["spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec",
          "replicatedJobs", 0, "template", "spec", "template", "spec"]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "mutate"),
    [
        ("jobset", lambda o: _rename(o, ["spec", "network", "enableDNSHostnames"],
                                     "enableDnsHostnames")),
        ("jobset", lambda o: _move(o, ["spec", "failurePolicy", "maxRestarts"], ["spec"])),
        ("jobset", lambda o: _rename(o, ["spec", "replicatedJobs"], "replicatedJob")),
        ("jobset", lambda o: _rename(o, [*RJ_POD, "containers", 0, "volumeMounts"],
                                     "volumeMount")),
        ("jobset", lambda o: o["spec"]["failurePolicy"].update(restartStrategy="Restart")),
        ("trainjob", lambda o: _rename(o, ["spec", "trainer", "numNodes"], "numNode")),
        ("trainjob", lambda o: _move(o, ["spec", "trainer", "numProcPerNode"], ["spec"])),
        ("trainjob", lambda o: _rename(o, [*TJ_POD, "containers", 0, "volumeMounts"],
                                       "volumeMount")),
        ("trainjob", lambda o: _move(o, [*TJ_POD, "tolerations"], [*TJ_POD, "containers", 0])),
        ("trainjob", lambda o: o["spec"]["runtimeRef"].pop("name")),
    ],
    ids=[
        "jobset-misspelt-network-field", "jobset-maxRestarts-misplaced",
        "jobset-misspelt-replicatedJobs", "jobset-misspelt-core-field-inside",
        "jobset-unknown-restart-strategy", "trainjob-misspelt-numNodes",
        "trainjob-numProcPerNode-misplaced", "trainjob-misspelt-volumeMounts",
        "trainjob-tolerations-in-the-container", "trainjob-runtime-without-name",
    ],
)
def test_a_misspelt_or_misplaced_field_fails_the_schema(target: str, mutate: Any) -> None:
    obj = copy.deepcopy(render(target, nodes=2)[1])
    validate_crd(obj, K8S_VERSIONS[0])  # as rendered: valid
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(obj, K8S_VERSIONS[0])


def test_a_trainer_pod_starts_torchrun_from_the_runtimes_environment() -> None:
    env = {"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "t-node-0-0.t", "PET_MASTER_PORT": "29400"}
    joined = " ".join(torchrun_command(Layout(2, 2), "s.yaml", env))
    assert "--nnodes 2 --node-rank 1 --rdzv-backend static --master-addr t-node-0-0.t" in joined
    assert "--master-port 29400" in joined
    # The Indexed Job's own variables win where both are set.
    both = {**env, "JOB_COMPLETION_INDEX": "0", "QLORA_MASTER_ADDR": "j-0.j"}
    assert "--node-rank 0 --rdzv-backend static --master-addr j-0.j" in " ".join(
        torchrun_command(Layout(2, 2), "s.yaml", both)
    )


def test_the_longest_name_leaves_room_for_every_pod_hostname() -> None:
    """metadata.name (40 characters at most) + hash + re-plan suffix + a JobSet's
    ``-node-0-<index>`` stays a DNS label (63) for the most nodes a spec may ask (64)."""
    doc = yaml.safe_load((REPO / "examples" / "llama-3.1-8b.yaml").read_text(encoding="utf-8"))
    doc["metadata"]["name"] = "a" * 40
    doc["spec"]["training"]["target_effective_batch_size"] = 64
    doc["spec"]["training"]["gradient_accumulation_steps"] = "auto"
    doc["spec"]["resources"] = {"nodes": 64}
    spec = validate_document(doc, "8b.yaml")
    found = bundled_config("llama-3.1-8b")
    assert found is not None
    s = settings("jobset")
    objects = render_objects(spec, make_plan(spec, s, model_config=found.config), s, attempt=9)
    name = objects[1]["metadata"]["name"]
    assert len(jobset.pod_hostname(name, 64)) <= names.MAX_NAME_LENGTH, name


def test_the_target_is_a_deployment_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner.settings import load_settings

    monkeypatch.setenv("QLORA_MULTI_NODE_TARGET", "trainjob")
    monkeypatch.setenv("QLORA_TRAINER_RUNTIME", "torch-nccl")
    s = load_settings()
    assert (s.multi_node_target, s.trainer_runtime) == ("trainjob", "torch-nccl")
    monkeypatch.setenv("QLORA_MULTI_NODE_TARGET", "jobsets")
    with pytest.raises(SpecError) as e:
        load_settings()
    assert any(line.startswith("QLORA_MULTI_NODE_TARGET: ") for line in e.value.lines())
