"""Data parallelism in spec, plan and render: pure code, milliseconds, no cluster.

What a user writing ``resources.gpus_per_node: 2`` or ``resources.nodes: 2`` in the 8B
example sees: the per-GPU estimate with DDP's own terms, micro batch x accumulation x world
size equal to the target exactly, the all-reduce in the runtime, the backend choice, and the
rendered objects (one pod with N GPUs, or an Indexed Job + headless Service), each
schema-checked for Kubernetes 1.30+.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from runner.errors import PlanError, SpecError
from runner.k8s import render_objects
from runner.launch import Layout, group_exit_code, torchrun_command
from runner.plan import bundled_config, make_plan
from runner.plan.parallel import Layout as PlanLayout
from runner.plan.parallel import allreduce_seconds, candidate_layouts
from runner.settings import Settings
from runner.spec import validate_document

REPO = Path(__file__).resolve().parent.parent
SETTINGS = Settings(s3_endpoint_url="http://s3.storage.svc:8333", pushgateway_url=None)
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def spec_8b(**resources: Any) -> Any:
    doc = yaml.safe_load((REPO / "examples" / "llama-3.1-8b.yaml").read_text(encoding="utf-8"))
    doc["spec"].setdefault("resources", {}).update(resources)
    doc["spec"]["training"]["max_steps"] = 4000
    return validate_document(doc, "8b.yaml")


def plan_of(spec: Any, settings: Settings = SETTINGS) -> Any:
    found = bundled_config("llama-3.1-8b")
    assert found is not None
    return make_plan(spec, settings, model_config=found.config)


def test_two_gpus_keep_the_effective_batch_and_add_ddp_memory() -> None:
    one, two = plan_of(spec_8b()), plan_of(spec_8b(gpus_per_node=2))
    assert (two.world_size, two.gpus_per_node, two.nodes) == (2, 2, 1)
    target = spec_8b().spec.training.target_effective_batch_size
    assert two.micro_batch_size * two.gradient_accumulation_steps * 2 == target
    assert one.micro_batch_size * one.gradient_accumulation_steps == target
    terms = {t.name: t.bytes for t in two.vram_terms}
    assert terms["ddp_gradient_buckets"] == terms["lora_grads"] > 0
    assert "nccl_buffers" in terms
    assert "ddp_gradient_buckets" not in {t.name for t in one.vram_terms}
    assert two.vram_estimate_bytes == sum(terms.values())
    assert two.allreduce_s_per_step > 0 == one.allreduce_s_per_step
    assert two.backend == "transformers"  # Unsloth's DDP is behind QLORA_UNSLOTH_DDP
    assert any("all-reduce of the LoRA gradients" in r for r in two.reasons)
    assert any("nvidia.com/gpu.count Gt 1" in r for r in two.reasons)


def test_unsloth_over_several_ranks_needs_its_setting() -> None:
    doc = yaml.safe_load((REPO / "examples" / "llama-3.1-8b.yaml").read_text(encoding="utf-8"))
    doc["spec"]["training"]["backend"] = "unsloth"
    doc["spec"]["resources"] = {"gpus_per_node": 2}
    unsloth = validate_document(doc, "8b.yaml")
    with pytest.raises(SpecError, match="QLORA_UNSLOTH_DDP"):
        plan_of(unsloth)
    on = Settings(unsloth_ddp=True, pushgateway_url=None)
    assert plan_of(unsloth, on).backend == "unsloth"
    assert plan_of(spec_8b(gpus_per_node=2), on).backend == "unsloth"


@pytest.mark.parametrize(
    ("resources", "match"),
    [
        ({"gpus_per_node": 3}, "not a multiple of the world size 3.*use 15 or 18"),
        ({"nodes": 5}, "not a multiple of the world size 5"),
    ],
    ids=["3-gpus", "5-nodes"],
)
def test_a_world_size_that_does_not_divide_the_target_is_refused(
    resources: dict[str, Any], match: str
) -> None:
    with pytest.raises(SpecError) as e:
        spec_8b(**resources)
    assert re.search(match, "\n".join(e.value.lines())), e.value.lines()


def test_auto_adds_gpus_only_for_a_deadline() -> None:
    plain = plan_of(spec_8b(gpus_per_node="auto"))
    assert plain.world_size == 1
    assert any("no resources.deadline_hours goal" in r for r in plain.reasons)
    slow = plan_of(spec_8b()).estimated_runtime_s
    goal_h = slow / 3600 / 3
    fast = plan_of(spec_8b(gpus_per_node="auto", deadline_hours=goal_h))
    assert fast.world_size > 1 and fast.estimated_runtime_s <= goal_h * 3600
    assert any("meets resources.deadline_hours" in r for r in fast.reasons)
    # The fewest: half as many GPUs would miss it.
    assert fast.world_size == 2 or plan_of(
        spec_8b(gpus_per_node=fast.world_size // 2)
    ).estimated_runtime_s > goal_h * 3600


def test_a_job_that_fits_no_gpu_is_not_helped_by_more_gpus() -> None:
    doc = yaml.safe_load((REPO / "examples" / "llama-3.3-70b.yaml").read_text(encoding="utf-8"))
    doc["spec"]["quantization"] = {"mode": "16bit"}
    doc["spec"]["resources"] = {"gpus_per_node": "auto", "deadline_hours": 1}
    doc["spec"]["training"]["max_steps"] = 100
    found = bundled_config("meta-llama/Llama-3.3-70B-Instruct")
    assert found is not None
    with pytest.raises(PlanError) as e:
        make_plan(validate_document(doc, "70b.yaml"), SETTINGS, model_config=found.config)
    assert any("DDP keeps the whole model on every GPU" in line for line in e.value.lines())


def test_layouts_grow_gpus_before_nodes_and_allreduce_grows_with_the_world() -> None:
    lays = candidate_layouts("auto", "auto", max_gpus_per_node=4, max_nodes=2)
    assert [(x.gpus_per_node, x.nodes) for x in lays] == [(1, 1), (2, 1), (4, 1), (4, 2)]
    one_node = allreduce_seconds(10**8, PlanLayout(4, 1))
    assert allreduce_seconds(10**8, PlanLayout(1, 1)) == 0 < one_node
    assert allreduce_seconds(10**8, PlanLayout(4, 2)) > one_node  # the network is slower


def validate_k8s(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_one_node_renders_one_pod_with_n_gpus() -> None:
    spec = spec_8b(gpus_per_node=2)
    objects = render_objects(spec, plan_of(spec), SETTINGS)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]
    for o in objects:
        validate_k8s(o)
    pod = objects[1]["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"]: e for e in expr["nodeSelectorTerms"][0]["matchExpressions"]}
    assert keys["nvidia.com/gpu.count"] == {
        "key": "nvidia.com/gpu.count",
        "operator": "Gt",
        "values": ["1"],
    }
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Mi")) >= 2048
    assert "completionMode" not in objects[1]["spec"]


def test_two_nodes_render_an_indexed_job_behind_a_headless_service() -> None:
    spec = spec_8b(nodes=2)
    objects = render_objects(spec, plan_of(spec), SETTINGS, queue_name="gpu")
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    for o in objects:
        validate_k8s(o)
    svc, job = objects[1], objects[2]
    name = job["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["name"] == name
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    assert js["backoffLimit"] == 0 and js["suspend"] is True  # Kueue admits one workload
    pod = js["template"]["spec"]
    assert pod["subdomain"] == name
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["QLORA_MASTER_ADDR"] == f"{name}-0.{name}.qlora.svc"
    assert env["QLORA_MASTER_PORT"] == "29500"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_torchrun_command_standalone_or_static_rendezvous() -> None:
    single = torchrun_command(Layout(2, 1), "/etc/qlora/job.yaml", {})
    assert single[1:] == [
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
        "--standalone", "-m", "runner", "run", "--spec", "/etc/qlora/job.yaml",
    ]  # fmt: skip
    env = {"JOB_COMPLETION_INDEX": "1", "QLORA_MASTER_ADDR": "j-0.j.ns.svc"}
    multi = torchrun_command(Layout(4, 2), "s.yaml", env)
    joined = " ".join(multi)
    assert "--nnodes 2 --node-rank 1 --rdzv-backend static --master-addr j-0.j.ns.svc" in joined
    assert "--master-port 29500" in joined
    with pytest.raises(SpecError, match="JOB_COMPLETION_INDEX"):
        torchrun_command(Layout(1, 2), "s.yaml", {})


@pytest.mark.parametrize(
    ("codes", "torchrun_rc", "want"),
    [
        ({0: 0, 1: 0}, 0, 0),
        ({0: 7, 1: 7}, 1, 7),
        ({0: 2, 1: 2}, 1, 2),
        ({1: 6}, 1, 6),
        ({}, 1, 1),
    ],
    ids=["ok", "preempted", "bad-data", "rank1-oom", "killed"],
)
def test_group_exit_code(
    tmp_path: Path, codes: dict[int, int], torchrun_rc: int, want: int
) -> None:
    for rank, code in codes.items():
        (tmp_path / f"rank-{rank}.exit").write_text(str(code))
    assert group_exit_code(tmp_path, torchrun_rc) == want


def _pod(name: str, index: int | None, phase: str, created: str, **status: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if index is not None:
        meta["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return {"metadata": meta, "spec": {"nodeName": "n"}, "status": {"phase": phase, **status}}


def test_ranks_per_pod_find_the_newest_pod_of_each_rank() -> None:
    from runner.k8s.status import pod_of_rank, rank_statuses

    job = {"metadata": {"annotations": {"qlora-runner.io/ranks-per-pod": "2"}}}
    pods = [
        _pod("j-1-old", 1, "Failed", "2026-12-01T10:00:00Z"),
        _pod("j-0", 0, "Running", "2026-12-01T10:00:00Z"),
        _pod("j-1-new", 1, "Running", "2026-12-01T10:05:00Z"),
    ]
    rows = rank_statuses(job, pods)
    assert [(r.node_rank, r.ranks, r.pod_name) for r in rows] == [
        (0, (0, 1), "j-0"), (1, (2, 3), "j-1-new"),
    ]  # fmt: skip
    assert [pod_of_rank(job, pods, r) for r in range(5)] == [
        "j-0", "j-0", "j-1-new", "j-1-new", None,
    ]  # fmt: skip
    one = [_pod("single", None, "Running", "2026-12-01T10:00:00Z")]  # one pod, every rank
    assert pod_of_rank(job, one, 1) == "single" and pod_of_rank(job, one, 2) is None


def test_submit_refuses_a_jobset_target_before_any_api_call() -> None:
    from runner.k8s.submitter import Submitter

    class NoApi:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"API call {name} made")

    spec = spec_8b(nodes=2)
    jobset = Settings(s3_endpoint_url="http://s3:8333", pushgateway_url=None,
                      multi_node_target="jobset")
    with pytest.raises(SpecError, match="QLORA_MULTI_NODE_TARGET: a JobSet is rendered for"):
        Submitter(NoApi(), jobset).submit(spec, plan=plan_of(spec, jobset))  # type: ignore[arg-type]
