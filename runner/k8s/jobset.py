"""A run over several nodes as a JobSet (``jobset.x-k8s.io/v1alpha2``), for platforms that run
the JobSet controller already (``QLORA_MULTI_NODE_TARGET=jobset``).

Pure code. The JobSet wraps the very Indexed Job that :mod:`runner.k8s.manifests` renders for
several nodes (one replicated Job ``node``, ``replicas: 1``, its pods the nodes, node rank
from ``JOB_COMPLETION_INDEX``), so the pod template, exit-code policy and placement are the
same as with the plain Indexed Job. What the JobSet adds:

* its controller creates the headless Service (``network.enableDNSHostnames``), so index 0 is
  ``<jobset>-node-0-0.<jobset>``: the static rendezvous' master;
* **gang restart**: a failed child Job makes the controller recreate every Job of the set
  (``failurePolicy``, ``restartStrategy: Recreate``, at most ``backoffLimit`` times), and
  training resumes from the checkpoint; a Job that failed through its ``podFailurePolicy``
  (an exit code that a retry cannot fix: bad data, out of memory, a deadline) fails the
  JobSet at once instead;
* success only when every Job succeeded (``successPolicy: All``), and Kueue admits the JobSet
  as one workload (queue label, created suspended).

Field names follow the project's API types (``api/jobset/v1alpha2/jobset_types.go``); the
tests check the rendered object against a schema of exactly these fields.
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "jobset.x-k8s.io/v1alpha2"
KIND = "JobSet"
REPLICATED_JOB = "node"
"""The one replicated Job; its pods are ``<jobset>-node-0-<index>``."""
POD_FAILURE_POLICY_REASON = "PodFailurePolicy"
"""A child Job's failure reason when its ``podFailurePolicy`` failed it (batch/v1)."""


def master_host(name: str, namespace: str) -> str:
    """Index 0's stable hostname under the JobSet's headless Service."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}.{namespace}.svc"


def pod_hostname(name: str, nodes: int) -> str:
    """The longest pod hostname of the set (must stay a DNS label of at most 63 chars)."""
    return f"{name}-{REPLICATED_JOB}-0-{nodes - 1}"


def render_jobset(job: dict[str, Any], *, restarts: int) -> dict[str, Any]:
    """The JobSet around ``job`` (a rendered Indexed Job over several nodes).

    Args:
        job: The ``batch/v1`` Job :func:`runner.k8s.manifests.render_objects` built, with
            ``completionMode: Indexed``; its ``suspend`` and queue label move to the JobSet.
        restarts: Gang restarts before the JobSet fails (the Job policy's backoff limit).
    """
    meta = copy.deepcopy(job["metadata"])
    name = str(meta["name"])
    spec = copy.deepcopy(job["spec"])
    suspend = bool(spec.pop("suspend", False))
    ttl = spec.pop("ttlSecondsAfterFinished", None)
    pod = spec["template"]["spec"]
    pod.pop("subdomain", None)  # the JobSet controller sets it to its own Service
    template_labels = {k: v for k, v in meta.get("labels", {}).items()
                       if not k.startswith("kueue.x-k8s.io/")}
    jobset_spec: dict[str, Any] = {
        "replicatedJobs": [
            {
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"metadata": {"labels": template_labels}, "spec": spec},
            }
        ],
        "network": {
            "enableDNSHostnames": True,
            "subdomain": name,
            "publishNotReadyAddresses": True,  # ranks resolve each other before any is ready
        },
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
        "failurePolicy": {
            "maxRestarts": restarts,
            "restartStrategy": "Recreate",
            "rules": [
                {
                    "name": "ExitCodeFailsTheJob",
                    "action": "FailJobSet",
                    "onJobFailureReasons": [POD_FAILURE_POLICY_REASON, "DeadlineExceeded"],
                }
            ],
        },
        "suspend": suspend,
    }
    if ttl is not None:
        jobset_spec["ttlSecondsAfterFinished"] = ttl
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": jobset_spec}
