"""JSON Schema of the job spec, for editors, ``qlora schema``, the CRD and the Helm chart."""

from __future__ import annotations

from typing import Any

from runner.spec.model import JobBody, JobSpec


def json_schema(body_only: bool = False) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12, as pydantic emits it) of the whole document.

    Args:
        body_only: Only the ``spec`` section (what the CRD's ``spec`` holds).
    """
    model = JobBody if body_only else JobSpec
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", model.__name__)
    return schema
