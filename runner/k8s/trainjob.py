"""A run over several nodes as a Kubeflow Trainer ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``)
on the platform's torch runtime (``QLORA_MULTI_NODE_TARGET=trainjob``).

Pure code. The Trainer owns the pods: its runtime (by default the ``torch-distributed``
ClusterTrainingRuntime, ``QLORA_TRAINER_RUNTIME``) holds the JobSet template with one
replicated Job ``node`` whose container is ``node``, and its torch plugin gives that container
torchrun's environment: ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the
completion index), ``PET_MASTER_ADDR`` (``<trainjob>-node-0-0.<trainjob>``) and
``PET_MASTER_PORT``. ``qlora run`` reads those when the Indexed Job's own variables are absent
(:mod:`runner.launch`). The TrainJob carries what the API lets a job set:

* ``trainer``: image, the ``qlora run`` command, our environment, ``numNodes``,
  ``numProcPerNode`` and ``resourcesPerNode`` from the plan;
* ``runtimePatches`` (one entry, manager ``qlora-runner.io/render``): the pod's volumes (the
  spec ConfigMap, ``/dev/shm`` and the caches), the container's mounts and security context,
  the pod's security context, GPU-class affinity and tolerations, image pull secrets, and our
  labels on the pods;
* ``activeDeadlineSeconds`` from the plan, and ``suspend`` plus the queue label for Kueue.

What the runtime keeps (the API offers no field for it): the grace period after SIGTERM (set
the runtime's ``terminationGracePeriodSeconds`` to 300 s or more so a checkpoint fits), the
restart policy, and a ``podFailurePolicy``; a platform running Trainer sets those once in its
runtime. Field names follow the project's API types
(``pkg/apis/trainer/v1alpha1/trainjob_types.go``); the tests check the rendered object against
a schema of exactly these fields. ``runtimePatches`` replaced ``podTemplateOverrides`` in
kubeflow/trainer#3309 (March 2026): a Trainer released before it refuses this TrainJob.
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
RUNTIME_API_GROUP = "trainer.kubeflow.org"
RUNTIME_KIND = "ClusterTrainingRuntime"
NODE = "node"
"""The torch runtime's replicated Job and container name."""
PATCH_MANAGER = "qlora-runner.io/render"


def render_trainjob(
    job: dict[str, Any], *, nodes: int, gpus_per_node: int, runtime: str
) -> dict[str, Any]:
    """The TrainJob for ``job`` (a rendered Indexed Job over several nodes).

    Args:
        job: The ``batch/v1`` Job :func:`runner.k8s.manifests.render_objects` built.
        nodes: Pods (nodes) of the run.
        gpus_per_node: Ranks per pod.
        runtime: The ClusterTrainingRuntime to run on.
    """
    meta = copy.deepcopy(job["metadata"])
    spec = job["spec"]
    template = spec["template"]
    pod = template["spec"]
    train = pod["containers"][0]
    pod_patch: dict[str, Any] = {
        "volumes": copy.deepcopy(pod["volumes"]),
        "containers": [
            {
                "name": NODE,
                "volumeMounts": copy.deepcopy(train["volumeMounts"]),
                "securityContext": copy.deepcopy(train["securityContext"]),
            }
        ],
        "securityContext": copy.deepcopy(pod["securityContext"]),
        "tolerations": copy.deepcopy(pod.get("tolerations", [])),
    }
    if "affinity" in pod:
        pod_patch["affinity"] = copy.deepcopy(pod["affinity"])
    if "imagePullSecrets" in pod:
        pod_patch["imagePullSecrets"] = copy.deepcopy(pod["imagePullSecrets"])
    pod_meta = copy.deepcopy(template.get("metadata", {}))
    trainjob_spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "apiGroup": RUNTIME_API_GROUP, "kind": RUNTIME_KIND},
        "trainer": {
            "image": train["image"],
            "command": ["qlora", "run"],
            "env": copy.deepcopy(train["env"]),
            "numNodes": nodes,
            "numProcPerNode": gpus_per_node,
            "resourcesPerNode": copy.deepcopy(train["resources"]),
        },
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": NODE,
                                    "template": {
                                        "spec": {
                                            "template": {"metadata": pod_meta, "spec": pod_patch}
                                        }
                                    },
                                }
                            ]
                        }
                    }
                },
            }
        ],
        "suspend": bool(spec.get("suspend", False)),
        "activeDeadlineSeconds": spec["activeDeadlineSeconds"],
    }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": trainjob_spec}
