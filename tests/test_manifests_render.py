"""Unit tests of the rendered ConfigMap + Job: what a cluster operator would notice.

Plans are made by hand here so the renderer is tested on its own; the planner's real plans
are rendered in ``test_manifests_validate.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.errors import ExitCode, SpecError
from runner.k8s import names
from runner.k8s.manifests import (
    CONTAINER_NAME,
    JobPolicy,
    active_deadline_s,
    render_objects,
    to_yaml,
)
from runner.plan import GpuClass, Plan
from runner.settings import Settings
from runner.spec import load_spec, load_spec_text, spec_hash

GIB = 1024**3

SPEC = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: demo, labels: {team: nlp}}
spec:
  model: {source: s3://models/llama-3.1-8b}
  dataset: {sources: [s3://datasets/demo/train.jsonl]}
  output: {uri: s3://adapters/demo}
"""

FILE_SPEC = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: local}
spec:
  model: {source: /models/tiny}
  dataset: {sources: [/data/train.jsonl]}
  output: {uri: file:///data/out}
  metrics: {enabled: false}
"""

CLASSES = {
    "24GB": GpuClass("24GB", 22500),
    "48GB": GpuClass("48GB", 45000),
    "80GB": GpuClass("80GB", 79000),
    "pool": GpuClass(
        "80GBx2",
        79000,
        gpu_count=2,
        node_labels={"cloud.example.com/pool": "h100"},
        tolerations=(
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        ),
    ),
}


def make_plan(spec_text: str = SPEC, gpu: GpuClass = CLASSES["24GB"], **kw: Any) -> Plan:
    """A plausible hand-made plan for ``spec_text``."""
    spec = load_spec_text(spec_text)
    fields: dict[str, Any] = {
        "spec_hash": spec_hash(spec),
        "gpu_class": gpu,
        "backend": "unsloth",
        "quant_mode": "4bit",
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "vram_terms": (),
        "vram_estimate_bytes": 18 * GIB,
        "host_memory_bytes": 40 * GIB,
        "cpu_cores": 8,
        "tokens_per_step": 32768,
    }
    fields.update(kw)
    return Plan(**fields)


def render(
    spec_text: str = SPEC,
    gpu: GpuClass = CLASSES["24GB"],
    settings: Settings | None = None,
    **kw: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = load_spec_text(spec_text)
    cm, job = render_objects(spec, make_plan(spec_text, gpu), settings or Settings(), **kw)
    return cm, job


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod(job)["containers"]
    return c  # type: ignore[no-any-return]


def walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


# --- names -------------------------------------------------------------------------------


def test_names_are_deterministic_and_change_with_the_spec() -> None:
    a1, j1 = render()
    _, j2 = render()
    assert j1["metadata"]["name"] == j2["metadata"]["name"] == a1["metadata"]["name"]
    _, other = render(SPEC.replace("train.jsonl", "other.jsonl"))
    assert other["metadata"]["name"] != j1["metadata"]["name"]
    assert j1["metadata"]["name"].startswith("demo-")


def test_relabelling_keeps_the_name() -> None:
    _, j1 = render()
    _, j2 = render(SPEC.replace("team: nlp", "team: vision"))
    assert j1["metadata"]["name"] == j2["metadata"]["name"]


@pytest.mark.parametrize("attempt", [0, 1, 12], ids=lambda a: f"attempt{a}")
def test_longest_name_fits_63(attempt: int) -> None:
    long_name = "a" * 40
    _, job = render(SPEC.replace("name: demo", f"name: {long_name}"), attempt=attempt)
    name = job["metadata"]["name"]
    assert names.is_dns1123_label(name)
    assert len(name) <= 63
    assert name.endswith(f"-r{attempt}") == (attempt > 0)


def test_object_name_truncates_base() -> None:
    assert len(names.object_name("x" * 70, "abcdef12")) == 63
    with pytest.raises(ValueError, match="DNS-1123"):
        names.object_name("Bad_Name", "1")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("24GB", "24GB"), ("80GB x2", "80GB-x2"), ("-odd-", "odd"), ("a" * 80, "a" * 63)],
)
def test_label_value(raw: str, expected: str) -> None:
    assert names.label_value(raw) == expected
    assert names.is_label_value(names.label_value(raw))


# --- placement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "threshold"), [("24GB", "22499"), ("48GB", "44999"), ("80GB", "78999")]
)
def test_affinity_threshold_per_class(cls: str, threshold: str) -> None:
    _, job = render(gpu=CLASSES[cls])
    terms = pod(job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = terms["nodeSelectorTerms"]
    assert term["matchExpressions"][0] == {
        "key": "nvidia.com/gpu.memory",
        "operator": "Gt",
        "values": [threshold],
    }


@pytest.mark.parametrize(
    ("below", "expected"), [(45000, "45000"), (None, None)], ids=["next", "top"]
)
def test_affinity_prefers_the_smallest_fitting_card(
    below: int | None, expected: str | None
) -> None:
    spec = load_spec_text(SPEC)
    plan = make_plan(SPEC, CLASSES["24GB"], prefer_below_mib=below)
    _, job = render_objects(spec, plan, Settings())
    affinity = pod(job)["affinity"]["nodeAffinity"]
    preferred = affinity.get("preferredDuringSchedulingIgnoredDuringExecution")
    if expected is None:
        assert preferred is None
        return
    assert preferred == [
        {
            "weight": 100,
            "preference": {
                "matchExpressions": [
                    {"key": "nvidia.com/gpu.memory", "operator": "Lt", "values": [expected]}
                ]
            },
        }
    ]


def test_planner_names_the_next_class_floor() -> None:
    from runner.plan import make_plan as plan_for

    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "llama-3.1-8b.yaml")
    plan = plan_for(spec, Settings())
    assert plan.gpu_class.name == "24GB"
    assert plan.prefer_below_mib == 45000


def test_affinity_label_key_is_a_setting() -> None:
    _, job = render(settings=Settings(gpu_memory_label="example.com/gpu-mem-mib"))
    nodes = pod(job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expr = nodes["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert expr["key"] == "example.com/gpu-mem-mib"


def test_class_labels_tolerations_and_gpu_count() -> None:
    _, job = render(gpu=CLASSES["pool"])
    nodes = pod(job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = nodes["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "cloud.example.com/pool", "operator": "In", "values": ["h100"]} in exprs
    tolerations = pod(job)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in (
        tolerations
    )
    res = container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2"
    assert job["metadata"]["labels"][names.LABEL_GPU_CLASS] == "80GBx2"


def test_cpu_only_class_asks_for_no_gpu() -> None:
    _, job = render(gpu=GpuClass("cpu", 0, gpu_count=0))
    assert "affinity" not in pod(job)
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    assert pod(job)["tolerations"] == []


def test_requests_come_from_the_plan() -> None:
    spec = load_spec_text(SPEC)
    plan = make_plan(host_memory_bytes=100 * GIB + 1, cpu_cores=12)
    _, job = render_objects(spec, plan, Settings())
    res = container(job)["resources"]
    assert res["requests"]["cpu"] == "12"
    assert res["requests"]["memory"] == f"{100 * 1024 + 1}Mi"  # rounded up, never down
    shm = next(v for v in pod(job)["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16384Mi"}
    assert res["limits"]["memory"] == f"{100 * 1024 + 1 + 16384}Mi"


# --- security ----------------------------------------------------------------------------


def test_security_context() -> None:
    _, job = render()
    psc = pod(job)["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container(job)["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert pod(job)["automountServiceAccountToken"] is False


def test_every_written_path_is_an_emptydir() -> None:
    _, job = render()
    volumes = {v["name"]: v for v in pod(job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "HOME", "QLORA_WORK_DIR"):
        path = env[var]
        mount = max((m for m in mounts if path.startswith(m)), key=len)
        assert "emptyDir" in volumes[mounts[mount]], var
    for path in ("/tmp", "/dev/shm", container(job)["workingDir"]):
        assert "emptyDir" in volumes[mounts[path]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/etc/qlora"]]["configMap"]["name"] == job["metadata"]["name"]


def test_s3_credentials_only_by_secret_key_ref() -> None:
    _, job = render(settings=Settings(s3_secret_name="team-s3", s3_endpoint_url="http://s3:8333"))
    env = {e["name"]: e for e in container(job)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "team-s3", "key": key}}
    assert env["QLORA_S3_ENDPOINT_URL"]["value"] == "http://s3:8333"


def test_no_secret_values_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    objs = list(render())
    text = to_yaml(objs)
    assert secret not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    for node in walk(objs):
        if isinstance(node, dict) and node.get("name", "").startswith("AWS_"):
            assert set(node) == {"name", "valueFrom"}


def test_file_only_job_needs_no_secret() -> None:
    _, job = render(FILE_SPEC, gpu=CLASSES["24GB"])
    assert not any("secretKeyRef" in json.dumps(e) for e in container(job)["env"])


# --- lifecycle ---------------------------------------------------------------------------


def _rule_for(job: dict[str, Any], code: int) -> str | None:
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes and codes["operator"] == "In" and code in codes["values"]:
            return str(rule["action"])
    return None


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (ExitCode.INVALID_INPUT, "FailJob"),
        (ExitCode.CUDA_OOM, "FailJob"),
        (ExitCode.PREEMPTED, "Ignore"),
        (ExitCode.INTERNAL, None),  # counts against backoffLimit: a retry resumes
        (ExitCode.STORAGE, None),
    ],
    ids=lambda v: v.name if isinstance(v, ExitCode) else str(v),
)
def test_pod_failure_policy_by_exit_code(code: ExitCode, action: str | None) -> None:
    _, job = render()
    assert _rule_for(job, int(code)) == action


def test_disruption_is_ignored_first() -> None:
    _, job = render()
    first = job["spec"]["podFailurePolicy"]["rules"][0]
    assert first == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == CONTAINER_NAME


def test_job_lifetime_fields() -> None:
    _, job = render(policy=JobPolicy(backoff_limit=1, termination_grace_s=600))
    spec = job["spec"]
    assert spec["backoffLimit"] == 1
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert pod(job)["restartPolicy"] == "Never"
    assert pod(job)["terminationGracePeriodSeconds"] == 600
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


@pytest.mark.parametrize(
    ("estimate", "deadline"),
    [(None, 3 * 86400), (60.0, 2 * 3600), (10 * 3600.0, 40 * 3600), (30 * 86400.0, 14 * 86400)],
    ids=["unknown", "floor", "4x", "cap"],
)
def test_active_deadline(estimate: float | None, deadline: int) -> None:
    assert active_deadline_s(make_plan(estimated_runtime_s=estimate)) == deadline
    assert active_deadline_s(make_plan(), JobPolicy(active_deadline_s=5)) == 5


# --- labels, Kueue, metrics, owner -------------------------------------------------------


def test_labels() -> None:
    cm, job = render()
    spec = load_spec_text(SPEC)
    for obj in (cm, job, job["spec"]["template"]):
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "component", "part-of", "managed-by", "version"):
            assert f"app.kubernetes.io/{key}" in labels
        assert labels[names.LABEL_JOB] == "demo"
        assert labels[names.LABEL_SPEC_HASH] == spec_hash(spec)[:16]
        assert labels["team"] == "nlp"
        assert all(names.is_label_value(v) for v in labels.values())
    assert job["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH] == spec_hash(spec)


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ("{app.kubernetes.io/name: mine}", "reserved"),
        ('{"bad key!": x}', "not a valid label key"),
        ("{team: 'white space'}", "not a valid label value"),
    ],
    ids=["reserved", "bad-key", "bad-value"],
)
def test_bad_user_labels_are_spec_errors(labels: str, fragment: str) -> None:
    with pytest.raises(SpecError) as err:
        render(SPEC.replace("{team: nlp}", labels))
    assert fragment in "\n".join(err.value.details)
    assert err.value.details[0].startswith('metadata.labels["')


@pytest.mark.parametrize("queue", [None, "team-a"], ids=["no-queue", "kueue"])
def test_kueue_queue_suspends(queue: str | None) -> None:
    _, job = render(queue_name=queue)
    assert job["metadata"]["labels"].get(names.LABEL_KUEUE_QUEUE) == queue
    assert job["spec"].get("suspend", False) is (queue is not None)
    assert names.LABEL_KUEUE_QUEUE not in job["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("queue", ["Team A", "", "q" * 64], ids=["space", "empty", "long"])
def test_invalid_queue_name_is_a_spec_error(queue: str) -> None:
    with pytest.raises(SpecError, match=r"kueue\.x-k8s\.io/queue-name"):
        render(queue_name=queue)


def test_metrics_scrape_metadata() -> None:
    _, job = render(SPEC + "  metrics: {port: 9500}\n")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9500"
    assert container(job)["ports"] == [
        {"name": "metrics", "containerPort": 9500, "protocol": "TCP"}
    ]
    _, quiet = render(FILE_SPEC)
    assert quiet["spec"]["template"]["metadata"]["annotations"] == {}
    assert "ports" not in container(quiet)


def test_owner_reference_and_namespace() -> None:
    owner = {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "1234-5678"},
    }
    for obj in render(owner=owner):
        assert obj["metadata"]["namespace"] == "team-a"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "qlora-runner.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "demo",
            "uid": "1234-5678",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    cm, _ = render(owner=owner, namespace="other")
    assert cm["metadata"]["namespace"] == "other"
    with pytest.raises(ValueError, match="uid"):
        render(owner={"apiVersion": "v1", "kind": "X", "name": "n"})


def test_image_and_pull_secrets_from_settings() -> None:
    _, job = render(settings=Settings(image="ml/qlora-runner:1.2", image_pull_secrets=["reg"]))
    assert container(job)["image"] == "ml/qlora-runner:1.2"
    assert pod(job)["imagePullSecrets"] == [{"name": "reg"}]
    _, plain = render()
    assert "imagePullSecrets" not in pod(plain)


def test_namespace_from_settings() -> None:
    cm, job = render(settings=Settings(namespace="ml"))
    assert cm["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml"


# --- ConfigMap content -------------------------------------------------------------------


def test_config_map_round_trips_spec_and_plan() -> None:
    spec = load_spec_text(SPEC)
    plan = make_plan(reasons=("24GB: 18 GiB of 20.3 GiB usable",))
    cm, job = render_objects(spec, plan, Settings())
    assert spec_hash(load_spec_text(cm["data"]["job.yaml"])) == spec_hash(spec)
    assert Plan.from_json(cm["data"]["plan.json"]) == plan
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    assert env["QLORA_SPEC"] == "/etc/qlora/job.yaml"
    assert env["QLORA_PLAN"] == "/etc/qlora/plan.json"


def test_yaml_stream_round_trips() -> None:
    objs = list(render())
    text = to_yaml(objs)
    assert list(yaml.safe_load_all(text)) == objs
    assert "job.yaml: |" in text  # the mounted spec stays readable in the YAML


def test_plan_change_keeps_names_but_changes_plan_json() -> None:
    spec = load_spec_text(SPEC)
    p1 = make_plan()
    p2 = replace(p1, micro_batch_size=1, gradient_accumulation_steps=16)
    cm1, _ = render_objects(spec, p1, Settings())
    cm2, _ = render_objects(spec, p2, Settings())
    assert cm1["metadata"]["name"] == cm2["metadata"]["name"]
    assert cm1["data"]["plan.json"] != cm2["data"]["plan.json"]


def test_the_pod_learns_its_namespace_from_the_downward_api() -> None:
    """The runner groups its Pushgateway push by namespace; the pod's own, not a setting."""
    _, job = render(settings=Settings(namespace="rendered-for"))
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["QLORA_NAMESPACE"] == {
        "name": "QLORA_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }


def test_host_network_setting_puts_the_pod_on_the_node_network() -> None:
    """QLORA_HOST_NETWORK (a one-node cluster whose S3 is on the node's loopback): the pod
    shares the node's network and keeps cluster DNS; off by default."""
    assert "hostNetwork" not in pod(render()[1])
    spec = pod(render(settings=Settings(host_network=True))[1])
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
