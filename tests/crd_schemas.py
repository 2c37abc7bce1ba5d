"""Schemas of the JobSet and TrainJob fields qlora-runner renders, written by us from the
projects' API types, so that a misspelt or misplaced field fails a test.

Sources (read, not copied; the field names, enums, patterns and limits are theirs):

* JobSet ``jobset.x-k8s.io/v1alpha2``: kubernetes-sigs/jobset
  ``api/jobset/v1alpha2/jobset_types.go`` (commit 0336a8fd9fd3): ``JobSetSpec``,
  ``ReplicatedJob``, ``Network``, ``SuccessPolicy``, ``FailurePolicy``, ``FailurePolicyRule``.
* TrainJob ``trainer.kubeflow.org/v1alpha1``: kubeflow/trainer
  ``pkg/apis/trainer/v1alpha1/trainjob_types.go`` (commit 0015772c282d): ``TrainJobSpec``,
  ``RuntimeRef``, ``Trainer``, ``RuntimePatch`` down to ``PodSpecPatch`` and
  ``ContainerPatch``.

Only the fields we emit (and their siblings where cheap) are listed; every object is closed
(``additionalProperties: false``), so an unknown key is an error. Kubernetes' own types inside
(``JobTemplateSpec``, ``Volume``, ``Affinity``, ``EnvVar`` ...) are ``$ref``s into the
Kubernetes OpenAPI definitions of ``kubernetes-validate`` (strict variant), resolved for the
version a test asks for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"


def core(name: str) -> dict[str, str]:
    """A reference to a Kubernetes type, e.g. ``io.k8s.api.core.v1.Volume``."""
    return {"$ref": K8S + name}


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def array_of(item: dict[str, Any], max_items: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": item}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
NAME_LIST = {"type": "array", "items": {"type": "string"}}

JOBSET_V1ALPHA2: dict[str, Any] = closed(
    {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": core("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": closed(
            {
                "replicatedJobs": array_of(
                    closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "groupName": {"type": "string"},
                            "template": core("io.k8s.api.batch.v1.JobTemplateSpec"),
                            "replicas": INT32,
                        },
                        ("name", "template"),
                    )
                ),
                "network": closed(
                    {
                        "enableDNSHostnames": {"type": "boolean"},
                        "subdomain": {"type": "string"},
                        "publishNotReadyAddresses": {"type": "boolean"},
                    }
                ),
                "successPolicy": closed(
                    {"operator": {"enum": ["All", "Any"]}, "targetReplicatedJobs": NAME_LIST},
                    ("operator",),
                ),
                "failurePolicy": closed(
                    {
                        "maxRestarts": INT32,
                        "restartStrategy": {
                            "enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]
                        },
                        "rules": array_of(
                            closed(
                                {
                                    "name": {
                                        "type": "string",
                                        "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                                    },
                                    "action": {
                                        "enum": [
                                            "FailJobSet",
                                            "RestartJobSet",
                                            "RestartJobSetAndIgnoreMaxRestarts",
                                            "RestartJob",
                                            "RestartJobAndIgnoreMaxRestarts",
                                        ]
                                    },
                                    "onJobFailureReasons": {**NAME_LIST, "uniqueItems": True},
                                    "onJobFailureMessagePatterns": NAME_LIST,
                                    "targetReplicatedJobs": NAME_LIST,
                                },
                                ("name", "action"),
                            )
                        ),
                    }
                ),
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string", "maxLength": 63},
                "ttlSecondsAfterFinished": {**INT32, "minimum": 0},
            },
            ("replicatedJobs",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

_LABELS_ONLY_META = closed(
    {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    }
)
_DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

_CONTAINER_PATCH = closed(
    {
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "env": array_of(core("io.k8s.api.core.v1.EnvVar"), 128),
        "volumeMounts": array_of(core("io.k8s.api.core.v1.VolumeMount"), 128),
        "securityContext": core("io.k8s.api.core.v1.SecurityContext"),
    },
    ("name",),
)
_POD_SPEC_PATCH = closed(
    {
        "serviceAccountName": {"type": "string", "maxLength": 253},
        "volumes": array_of(core("io.k8s.api.core.v1.Volume"), 128),
        "initContainers": array_of(_CONTAINER_PATCH, 64),
        "containers": array_of(_CONTAINER_PATCH, 64),
        "imagePullSecrets": array_of(core("io.k8s.api.core.v1.LocalObjectReference"), 64),
        "securityContext": core("io.k8s.api.core.v1.PodSecurityContext"),
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "affinity": core("io.k8s.api.core.v1.Affinity"),
        "tolerations": array_of(core("io.k8s.api.core.v1.Toleration"), 128),
        "schedulingGates": array_of(core("io.k8s.api.core.v1.PodSchedulingGate"), 16),
    }
)

_POD_TEMPLATE_PATCH = closed({"metadata": _LABELS_ONLY_META, "spec": _POD_SPEC_PATCH})
_JOB_TEMPLATE_PATCH = closed(
    {"metadata": _LABELS_ONLY_META, "spec": closed({"template": _POD_TEMPLATE_PATCH})}
)
_REPLICATED_JOB_PATCH = closed(
    {
        "name": {"type": "string", "pattern": _DNS_LABEL, "minLength": 1, "maxLength": 253},
        "template": _JOB_TEMPLATE_PATCH,
    },
    ("name",),
)
_RUNTIME_PATCH = closed(
    {
        "manager": {"type": "string", "minLength": 1, "maxLength": 253},
        "trainingRuntimeSpec": closed(
            {
                "template": closed(
                    {
                        "metadata": _LABELS_ONLY_META,
                        "spec": closed({"replicatedJobs": array_of(_REPLICATED_JOB_PATCH, 100)}),
                    }
                )
            }
        ),
    },
    ("manager",),
)

TRAINJOB_V1ALPHA1: dict[str, Any] = closed(
    {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"},
        "kind": {"const": "TrainJob"},
        "metadata": {
            "allOf": [
                core("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                # the CRD's CEL rules: an RFC 1035 label of at most 63 characters
                {
                    "properties": {
                        "name": {
                            "type": "string",
                            "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                            "maxLength": 63,
                        }
                    }
                },
            ]
        },
        "spec": closed(
            {
                "runtimeRef": closed(
                    {
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "apiGroup": {"type": "string", "maxLength": 253},
                        "kind": {"type": "string", "maxLength": 253},
                    },
                    ("name",),
                ),
                "trainer": closed(
                    {
                        "image": {"type": "string", "maxLength": 500},
                        "command": array_of({"type": "string", "maxLength": 65536}, 128),
                        "args": array_of({"type": "string", "maxLength": 65536}, 128),
                        "env": array_of(core("io.k8s.api.core.v1.EnvVar"), 128),
                        "numNodes": INT32,
                        "resourcesPerNode": core("io.k8s.api.core.v1.ResourceRequirements"),
                        "numProcPerNode": INT32,
                    }
                ),
                "runtimePatches": array_of(_RUNTIME_PATCH, 16),
                "suspend": {"type": "boolean"},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "managedBy": {
                    "enum": [
                        "trainer.kubeflow.org/trainjob-controller",
                        "kueue.x-k8s.io/multikueue",
                    ]
                },
            },
            ("runtimeRef",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

SCHEMAS = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): JOBSET_V1ALPHA2,
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): TRAINJOB_V1ALPHA1,
}


def _definitions(version: str) -> Any:
    """The strict definitions of the newest schema set not newer than ``version``."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    want = tuple(int(x) for x in version.split(".")[:2])
    found = sorted(
        tuple(int(x) for x in d.name[1:].split("-")[0].split(".")[:2])
        for d in root.glob("v*-local-strict")
    )
    major, minor = [v for v in found if v <= want][-1]
    folder = root / f"v{major}.{minor}.0-local-strict"
    return json.loads((folder / "_definitions.json").read_text(encoding="utf-8"))


def validate_crd(obj: dict[str, Any], k8s_version: str) -> None:
    """Validate a JobSet or TrainJob; raises ``jsonschema.ValidationError`` (with its path)."""
    schema = {"$id": "https://qlora-runner.io/api/crd", **SCHEMAS[(obj["apiVersion"], obj["kind"])]}
    defs = referencing.Resource.from_contents(_definitions(k8s_version))
    registry: referencing.Registry[Any] = defs @ referencing.Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
