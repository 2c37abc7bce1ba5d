"""Find image references in text and tell whether one names a registry host.

The project never names a registry host: images are ``repository:tag`` and installations
prefix their own registry. Checking the *shape* of each reference (a first path component with a
dot, a port or ``localhost`` is a host, as in the distribution reference grammar) catches any
host, not just a list of well-known ones.
"""

from __future__ import annotations

import re

_REF_RES = (
    re.compile(r"^\s*-?\s*image:\s*['\"]?([^\s'\"#]+)", re.MULTILINE),
    re.compile(r"^\s*(?:ARG|ENV)\s+\w*IMAGE\w*=['\"]?([^\s'\"]+)", re.MULTILINE),
    re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?([^\s$]\S*)", re.MULTILINE),
    re.compile(r"^\s*repository:\s*['\"]?([^\s'\"#]+)", re.MULTILINE),
)


def image_refs(text: str) -> list[str]:
    """Every image-like reference (``image:``, ``*IMAGE=`` args, ``FROM``, ``repository:``)."""
    return [m.group(1) for r in _REF_RES for m in r.finditer(text)]


def has_registry_host(ref: str) -> bool:
    """True if the reference's first component is a registry host (``host.tld/...``)."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")
