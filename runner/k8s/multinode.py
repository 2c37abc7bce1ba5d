"""The Kubernetes side of data parallelism: several GPUs in one pod, or one pod per node.

Pure code, like :mod:`runner.k8s.manifests`, which calls it:

* **one node** (``plan.nodes == 1``): the usual Job with one pod that requests
  ``nvidia.com/gpu: N``; the node must hold N GPUs (``nvidia.com/gpu.count Gt N-1``, GPU
  Feature Discovery's label) and ``qlora run`` starts ``torchrun --standalone`` in it;
* **several nodes**: the same Job made ``completionMode: Indexed`` with
  ``completions = parallelism = nodes``, plus a headless Service whose name is the pods'
  ``subdomain``, so index 0 has the stable name ``<job>-0.<service>``: the static rendezvous'
  master. Each pod's node rank is its completion index (``JOB_COMPLETION_INDEX``, set by the
  Job controller). The Job succeeds only when every index has succeeded; ``backoffLimit: 0``
  makes any failed pod fail the whole group (its peers cannot go on without it), and the
  operator recreates the Job, which resumes from the checkpoint. Kueue admits the Job as one
  workload, all pods or none.
"""

from __future__ import annotations

from typing import Any

from runner.plan.planner import GPU_COUNT_LABEL
from runner.plan.types import Plan

MASTER_PORT = 29500
"""The static rendezvous' port on index 0 (torchrun's default)."""
RENDEZVOUS_PORT_NAME = "rendezvous"


def service_name(job_name: str) -> str:
    """The headless Service's name: the Job's own (a Service name is a DNS-1035 label)."""
    return job_name


def master_host(job_name: str, namespace: str) -> str:
    """Index 0's stable hostname: ``<job>-0.<service>.<namespace>.svc``."""
    return f"{job_name}-0.{service_name(job_name)}.{namespace}.svc"


def gpu_count_expression(plan: Plan) -> dict[str, Any] | None:
    """``nvidia.com/gpu.count Gt N-1`` when one node must hold N > 1 GPUs."""
    if plan.gpus_per_node <= 1 or plan.gpu_class.gpu_count == 0:
        return None
    return {"key": GPU_COUNT_LABEL, "operator": "Gt", "values": [str(plan.gpus_per_node - 1)]}


def gpus_per_pod(plan: Plan) -> int:
    """``nvidia.com/gpu`` each pod requests."""
    return plan.gpu_class.gpu_count * plan.gpus_per_node


def headless_service(
    job_name: str, meta: dict[str, Any]
) -> dict[str, Any]:
    """The Service that gives every pod of the Indexed Job a stable DNS name."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**meta, "name": service_name(job_name)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks resolve each other before any is ready
            "selector": {"batch.kubernetes.io/job-name": job_name},
            # protocol spelt out: server-side apply keys the port list by (port, protocol)
            # and older API servers do not default it before merging
            "ports": [
                {
                    "name": RENDEZVOUS_PORT_NAME,
                    "port": MASTER_PORT,
                    "targetPort": MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def indexed_job_fields(plan: Plan) -> dict[str, Any]:
    """Job ``spec`` fields of a run over several nodes."""
    return {
        "completionMode": "Indexed",
        "completions": plan.nodes,
        "parallelism": plan.nodes,
        "backoffLimit": 0,
    }


def rank_env(master: str) -> list[dict[str, Any]]:
    """The rendezvous environment of every pod (the node rank is JOB_COMPLETION_INDEX)."""
    return [
        {"name": "QLORA_MASTER_ADDR", "value": master},
        {"name": "QLORA_MASTER_PORT", "value": str(MASTER_PORT)},
    ]
