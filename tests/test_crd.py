"""The FineTuneJob CRD: generated from the pydantic spec, structural, and committed as is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from runner.k8s.crd import (
    UnsupportedSchemaError,
    crd_manifest,
    crd_yaml,
    status_schema,
    structural_schema,
)
from runner.spec import JobBody, load_spec

REPO = Path(__file__).resolve().parent.parent
COMMITTED = [REPO / "manifests" / "crd.yaml", REPO / "helm" / "qlora-runner" / "files" / "crd.yaml"]
SPEC_FILES = [
    *sorted((REPO / "examples").glob("*.yaml")),
    REPO / "manifests" / "example-finetunejob.yaml",
]
# Keys a structural schema may not carry (or that OpenAPI v3.0 does not know).
FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title", "examples"}


def version() -> dict[str, Any]:
    (v,) = crd_manifest()["spec"]["versions"]
    return v  # type: ignore[no-any-return]


def spec_schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]["properties"]["spec"]  # type: ignore[no-any-return]


def nodes(schema: dict[str, Any], path: str = "spec") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for k, v in schema.get("properties", {}).items():
        yield from nodes(v, f"{path}.{k}")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[]")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_crd_is_generated(path: Path) -> None:
    rel = path.relative_to(REPO)
    assert path.read_text(encoding="utf-8") == crd_yaml(), (
        f"{rel} is stale; regenerate it: qlora render --crd > {rel}"
    )


def test_crd_validates_against_kubernetes_schemas() -> None:
    for v in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(crd_manifest(), v, strict=True)


def test_crd_identity() -> None:
    crd = crd_manifest()
    assert crd["metadata"]["name"] == "finetunejobs.qlora-runner.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "FineTuneJob",
        "finetunejobs",
        ["ftj"],
    )
    assert version()["name"] == "v1alpha1" and version()["storage"] is True
    assert version()["subresources"] == {"status": {}}


def test_schema_is_structural() -> None:
    for path, node in nodes(version()["schema"]["openAPIV3Schema"], "root"):
        assert not FORBIDDEN_KEYS & set(node), f"{path}: {FORBIDDEN_KEYS & set(node)}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        if "additionalProperties" in node:
            assert "properties" not in node, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}.{bound} must be a boolean"


def _model_fields(model: type[BaseModel], path: str) -> Iterator[tuple[str, str]]:
    for name, field in model.model_fields.items():
        sub = f"{path}.{field.alias or name}"
        yield sub, field.description or ""
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _model_fields(ann, sub)


def test_every_spec_field_is_in_the_crd_with_its_description() -> None:
    by_path = dict(nodes(spec_schema()))
    fields = list(_model_fields(JobBody, "spec"))
    assert len(fields) > 40
    for path, description in fields:
        assert path in by_path, f"{path} missing from the CRD"
        assert description in by_path[path].get("description", ""), path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("spec.lora.r", {"type": "integer", "minimum": 1, "maximum": 1024}),
        ("spec.dataset.eval_fraction", {"maximum": 0.5, "exclusiveMaximum": True}),
        ("spec.training.epochs", {"minimum": 0, "exclusiveMinimum": True}),
        ("spec.training.max_steps", {"type": "integer", "nullable": True, "minimum": 1}),
        ("spec.training.micro_batch_size", {"x-kubernetes-int-or-string": True}),
        ("spec.quantization.mode", {"enum": ["auto", "4bit", "dynamic-4bit", "16bit"]}),
        ("spec.dataset.sources", {"type": "array", "minItems": 1}),
        ("spec.metrics.port", {"minimum": 1024, "maximum": 65535}),
    ],
)
def test_constraints_survive(path: str, expected: dict[str, Any]) -> None:
    node = dict(nodes(spec_schema()))[path]
    assert expected.items() <= node.items(), node


def test_defaults_are_described_not_applied() -> None:
    node = dict(nodes(spec_schema()))["spec.lora.r"]
    assert "default" not in node
    assert "Default: 16." in node["description"]
    mb = dict(nodes(spec_schema()))["spec.training.micro_batch_size"]
    assert 'Allowed: "auto" or an integer from 1 to 1024.' in mb["description"]


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI's ``nullable`` as JSON Schema, so a draft-4 validator can check documents."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_example_specs_are_valid_finetunejobs(path: Path) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    load_spec(path)  # and valid for the operator's full validation
    schema = _openapi_to_jsonschema(version()["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator(schema).validate(doc)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"lora": {"r": 0}}, "minimum"),
        ({"quantization": {"mode": "8bit"}}, "is not one of"),
        ({"dataset": {"sources": []}}, "should be non-empty"),
        ({"training": {"epochs": 0}}, "less than or equal to the minimum"),
    ],
    ids=["rank-0", "bad-mode", "no-sources", "zero-epochs"],
)
def test_schema_rejects_bad_specs(patch: dict[str, Any], fragment: str) -> None:
    doc = yaml.safe_load(SPEC_FILES[-1].read_text(encoding="utf-8"))
    for section, values in patch.items():
        doc["spec"].setdefault(section, {}).update(values)
    schema = _openapi_to_jsonschema(version()["schema"]["openAPIV3Schema"])
    with pytest.raises(jsonschema.ValidationError, match=fragment):
        jsonschema.Draft4Validator(schema).validate(doc)


def test_printer_columns_point_at_status_fields() -> None:
    columns = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    for name in ("Class", "Phase", "Adapter", "Age"):
        assert name in columns
    props = status_schema()["properties"]
    for c in columns.values():
        field = c["jsonPath"].removeprefix(".status.")
        if c["jsonPath"].startswith(".status."):
            assert field in props, c


def test_status_allows_what_the_operator_writes() -> None:
    props = status_schema()["properties"]
    for key in (
        "phase",
        "observedGeneration",
        "specHash",
        "gpuClass",
        "vramEstimate",
        "vramEstimateBytes",
        "microBatchSize",
        "gradientAccumulationSteps",
        "jobName",
        "adapterURI",
        "reason",
        "message",
        "attempt",
        "conditions",
    ):
        assert key in props, key
    cond = props["conditions"]
    assert cond["x-kubernetes-list-map-keys"] == ["type"]
    assert set(cond["items"]["required"]) >= {"type", "status"}


def test_unknown_shapes_fail_loudly() -> None:
    with pytest.raises(UnsupportedSchemaError):
        structural_schema({"anyOf": [{"type": "number"}, {"type": "boolean"}]}, {})
    with pytest.raises(UnsupportedSchemaError):
        structural_schema({"description": "no type"}, {})
