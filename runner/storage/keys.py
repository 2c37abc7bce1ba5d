"""Safe object keys and storage URIs.

Object keys are built from spec values (``output.uri``), run ids and the names of files the
trainer wrote. A key with ``..``, a leading ``/``, a backslash or a control character could
escape the run's prefix in a ``file://`` store or confuse an S3 console, so every key the
runner writes or reads goes through :func:`join_key`. URI schemes are on an allow-list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runner.errors import SpecError

ALLOWED_SCHEMES = ("s3", "file")
"""Schemes :func:`parse_uri` accepts; anything else is rejected before any I/O."""

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_KEY_BYTES = 1024  # the S3 limit


class UnsafeKeyError(SpecError):
    """An object key or URI would escape its prefix or is not allowed (exit code 2)."""


@dataclass(frozen=True)
class StorageUri:
    """A parsed storage location.

    Attributes:
        scheme: ``s3`` or ``file``.
        root: The bucket (s3) or the absolute directory (file).
        key: The key prefix inside the root ('' for the root itself); always a safe key.
    """

    scheme: str
    root: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.root}/{self.key}" if self.key else f"s3://{self.root}"
        path = f"{self.root.rstrip('/')}/{self.key}" if self.key else self.root
        return f"file://{path}"


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` if it is a safe relative object key, else raise.

    Args:
        key: A ``/``-separated key such as ``runs/20261128T101500Z-ab12cd34-x7k2/manifest.json``.
        allow_empty: Accept ``''`` (the root of a store).

    Raises:
        UnsafeKeyError: on ``..`` or ``.`` segments, empty segments (``//``), a leading ``/``,
            backslashes, control characters, or more than 1024 bytes.
    """
    if not key:
        if allow_empty:
            return key
        raise UnsafeKeyError("object key is empty")
    problem = None
    if key.startswith("/"):
        problem = "is absolute (starts with '/')"
    elif "\\" in key:
        problem = "contains a backslash"
    elif _CONTROL_RE.search(key):
        problem = "contains a control character"
    elif len(key.encode()) > _MAX_KEY_BYTES:
        problem = f"is longer than {_MAX_KEY_BYTES} bytes"
    else:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            problem = "has an empty, '.' or '..' segment"
    if problem:
        raise UnsafeKeyError(f"{key!r}: unsafe object key: {problem}")
    return key


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` (ignoring empty parts and edge slashes) and check the result.

    Raises:
        UnsafeKeyError: if any part, or the joined key, is unsafe.
    """
    cleaned: list[str] = []
    for part in parts:
        if not part:
            continue
        if part.startswith("/") and not cleaned:
            raise UnsafeKeyError(f"{part!r}: unsafe object key: is absolute (starts with '/')")
        cleaned.append(part.strip("/"))
    return check_key("/".join(p for p in cleaned if p), allow_empty=True)


def relative_key(path: Path, base: Path) -> str:
    """The object key of a local file ``path`` below ``base`` (``/``-separated, checked)."""
    return check_key(path.relative_to(base).as_posix())


def parse_uri(uri: str) -> StorageUri:
    """Parse ``s3://bucket/prefix`` or ``file://path`` (relative paths: against the cwd).

    Raises:
        UnsafeKeyError: for another scheme, a malformed bucket, credentials in the URI, or an
            unsafe prefix.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ALLOWED_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in ALLOWED_SCHEMES)
        raise UnsafeKeyError(f"{uri!r}: unsupported storage URI; use one of {allowed}")
    if _CONTROL_RE.search(rest) or "\\" in rest:
        raise UnsafeKeyError(f"{uri!r}: the URI contains a control character or a backslash")
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            # Not echoed: the part before '@' may be a secret key.
            raise UnsafeKeyError(
                f"'s3://…@{bucket.rpartition('@')[2]}/…': the bucket part carries credentials "
                "or a port; credentials come from the environment, the endpoint from "
                "QLORA_S3_ENDPOINT_URL"
            )
        if not _BUCKET_RE.fullmatch(bucket):
            raise UnsafeKeyError(f"{uri!r}: {bucket!r} is not a valid bucket name")
        return StorageUri("s3", bucket, check_key(key.rstrip("/"), allow_empty=True))
    if not rest:
        raise UnsafeKeyError(f"{uri!r}: file:// needs a path, e.g. file:///data/adapters")
    if ".." in rest.split("/"):
        raise UnsafeKeyError(f"{uri!r}: the path contains '..'; name the directory directly")
    return StorageUri("file", str(Path(rest).absolute()), "")
