"""A strict schema of the Kueue ``v1beta1`` objects the chart emits, and a checker.

Written from Kueue's API reference (``kueue.x-k8s.io/v1beta1``: ResourceFlavor, ClusterQueue,
LocalQueue), limited to the fields the chart writes plus their documented siblings, with
``additionalProperties: false`` everywhere, so a misspelt field (``nodeLabel``, ``nominalQuotas``)
fails a test instead of being dropped by the API server. Kueue's CRDs are not in any registry
we can reach, so this stands in for them; the limits (16 resource groups, 16 flavors, 8 node
labels, ...) and patterns are Kueue's own. Beyond the schema, :func:`check_kueue` applies the
webhook rule the schema cannot state: each flavor lists exactly the group's
``coveredResources``, in order.
"""

from __future__ import annotations

from typing import Any

import jsonschema

KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue"}

_NAME = {
    "type": "string",
    "maxLength": 253,
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
_QUANTITY = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"},
    ]
}
_TOLERATION = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string"},
        "operator": {"enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _NAME,
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def _object(kind: str, spec: dict[str, Any], *, namespaced: bool) -> dict[str, Any]:
    meta = dict(_METADATA)
    if namespaced:
        meta = {**meta, "required": ["name", "namespace"]}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kueue.x-k8s.io/v1beta1"},
            "kind": {"const": kind},
            "metadata": meta,
            "spec": spec,
        },
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "ResourceFlavor": _object(
        "ResourceFlavor",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "nodeLabels": {
                    "type": "object",
                    "maxProperties": 8,
                    "additionalProperties": {"type": "string", "maxLength": 63},
                },
                "nodeTaints": {"type": "array", "maxItems": 8, "items": {"type": "object"}},
                "tolerations": {"type": "array", "maxItems": 8, "items": _TOLERATION},
                "topologyName": {"type": "string"},
            },
        },
        namespaced=False,
    ),
    "ClusterQueue": _object(
        "ClusterQueue",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resourceGroups": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["coveredResources", "flavors"],
                        "properties": {
                            "coveredResources": {
                                "type": "array",
                                "maxItems": 16,
                                "items": {"type": "string"},
                            },
                            "flavors": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 16,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "resources"],
                                    "properties": {
                                        "name": _NAME,
                                        "resources": {
                                            "type": "array",
                                            "minItems": 1,
                                            "maxItems": 16,
                                            "items": {
                                                "type": "object",
                                                "additionalProperties": False,
                                                "required": ["name", "nominalQuota"],
                                                "properties": {
                                                    "name": {"type": "string"},
                                                    "nominalQuota": _QUANTITY,
                                                    "borrowingLimit": _QUANTITY,
                                                    "lendingLimit": _QUANTITY,
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                "cohort": {"type": "string", "maxLength": 253},
                "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
                "namespaceSelector": _LABEL_SELECTOR,
                "flavorFungibility": {"type": "object"},
                "preemption": {"type": "object"},
                "admissionChecks": {"type": "array", "items": {"type": "string"}},
                "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]},
                "fairSharing": {"type": "object"},
            },
        },
        namespaced=False,
    ),
    "LocalQueue": _object(
        "LocalQueue",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["clusterQueue"],
            "properties": {
                "clusterQueue": _NAME,
                "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]},
                "fairSharing": {"type": "object"},
            },
        },
        namespaced=True,
    ),
}


def check_kueue(doc: dict[str, Any]) -> None:
    """Raise ``AssertionError`` when ``doc`` is not a valid Kueue object of the fields we emit."""
    schema = SCHEMAS[doc["kind"]]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )
    if doc["kind"] == "ClusterQueue":
        for group in doc["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                names = [r["name"] for r in flavor["resources"]]
                assert names == group["coveredResources"], (flavor["name"], names)
