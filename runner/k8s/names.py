"""Deterministic Kubernetes names and label values for rendered objects.

Resubmitting the same spec must hit the same objects (so ``kubectl apply`` and server-side
apply are idempotent), and two different specs must never collide. Names are therefore
``<metadata.name>-<first hex digits of the spec hash>``: DNS-1123 labels of at most 63
characters, because the Job controller copies the Job's name into the ``job-name`` label of
its pods, and label values are limited to 63.

Label keys used across the project (the submitter and operator select on them) live here too.
"""

from __future__ import annotations

import re

from runner.spec import JobSpec, spec_hash

# Kubernetes limits: DNS-1123 label (names of Jobs, ConfigMaps; label values).
MAX_NAME_LENGTH = 63
HASH_SUFFIX_LENGTH = 8
SPEC_HASH_LABEL_LENGTH = 16

GROUP = "qlora-runner.io"
APP_NAME = "qlora-runner"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_VERSION = "app.kubernetes.io/version"
LABEL_JOB = f"{GROUP}/job"
"""The spec's ``metadata.name``: ``qlora status NAME`` selects on it."""
LABEL_SPEC_HASH = f"{GROUP}/spec-hash"
"""The first 16 hex digits of the spec hash (a label value cannot hold all 64)."""
LABEL_GPU_CLASS = f"{GROUP}/gpu-class"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
"""The full 64-hex-digit spec hash."""
ANNOTATION_VRAM_ESTIMATE = f"{GROUP}/vram-estimate-bytes"
ANNOTATION_QUANT_MODE = f"{GROUP}/quant-mode"
ANNOTATION_RANKS_PER_POD = f"{GROUP}/ranks-per-pod"
"""On a Job of several ranks: torchrun processes in each pod (GPUs per node)."""

RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", f"{GROUP}/", "kueue.x-k8s.io/")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def is_dns1123_label(value: str) -> bool:
    """Whether ``value`` is a valid DNS-1123 label (Job, ConfigMap and namespace names)."""
    return len(value) <= MAX_NAME_LENGTH and bool(_DNS1123_LABEL.fullmatch(value))


def is_label_value(value: str) -> bool:
    """Whether ``value`` is a valid Kubernetes label value (empty is allowed)."""
    return len(value) <= MAX_NAME_LENGTH and bool(_LABEL_VALUE.fullmatch(value))


def is_label_key(key: str) -> bool:
    """Whether ``key`` is a valid label key: ``[prefix/]name``, prefix a DNS subdomain."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= MAX_NAME_LENGTH and bool(_LABEL_NAME_PART.fullmatch(name))


def label_value(value: str) -> str:
    """``value`` made into a valid label value: odd characters become '-', at most 63.

    Args:
        value: Any text, e.g. a GPU class name.

    Returns:
        A label value; empty if nothing usable is left.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:MAX_NAME_LENGTH]
    return cleaned.strip("-_.")


def object_name(base: str, suffix: str) -> str:
    """``<base>-<suffix>``, shortening ``base`` so the whole stays a DNS-1123 label.

    Args:
        base: A DNS-1123 label (e.g. the spec's ``metadata.name``).
        suffix: Lowercase alphanumerics and '-' (e.g. a hash prefix).

    Returns:
        A name of at most 63 characters.

    Raises:
        ValueError: if the result is not a DNS-1123 label.
    """
    room = MAX_NAME_LENGTH - len(suffix) - 1
    name = f"{base[:room].rstrip('-')}-{suffix}"
    if not is_dns1123_label(name):
        raise ValueError(f"'{name}' is not a DNS-1123 label")
    return name


def job_name(spec: JobSpec, attempt: int = 0) -> str:
    """The name of the rendered Job and ConfigMap for ``spec``.

    The same spec always gives the same name, so resubmitting it is idempotent; any change
    to the spec (defaults included, ``metadata.labels`` excluded) gives a new name.

    Args:
        spec: The job spec.
        attempt: Re-plan attempt (e.g. after a CUDA OOM the operator renders attempt 1 with
            a smaller micro batch); attempt 0 has no extra suffix.

    Returns:
        ``<metadata.name>-<8 hex>`` or ``<metadata.name>-<8 hex>-r<attempt>``.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    suffix = spec_hash(spec)[:HASH_SUFFIX_LENGTH]
    if attempt:
        suffix += f"-r{attempt}"
    return object_name(spec.metadata.name, suffix)


def spec_hash_label(spec: JobSpec) -> str:
    """The label-safe, truncated spec hash (the annotation holds the full one)."""
    return spec_hash(spec)[:SPEC_HASH_LABEL_LENGTH]
