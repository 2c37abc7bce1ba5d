"""Kubernetes objects for qlora-runner, built as plain data.

Pure code (no Kubernetes client): :func:`render_objects` turns a spec and its plan into the
ConfigMap + Job that run it, :func:`crd_manifest` builds the FineTuneJob CRD from the
pydantic spec. The submitter and operator (in their own adapter modules) apply what these
return; ``qlora render`` prints it.
"""

from runner.k8s.crd import crd_manifest, crd_yaml
from runner.k8s.manifests import (
    CONFIG_MOUNT_DIR,
    CONTAINER_NAME,
    PLAN_PATH,
    SPEC_PATH,
    JobPolicy,
    owner_reference,
    render_objects,
)
from runner.k8s.names import job_name

__all__ = [
    "CONFIG_MOUNT_DIR",
    "CONTAINER_NAME",
    "PLAN_PATH",
    "SPEC_PATH",
    "JobPolicy",
    "crd_manifest",
    "crd_yaml",
    "job_name",
    "owner_reference",
    "render_objects",
]
