"""The object-store interface every storage backend implements.

The publisher, the checkpointer and ``qlora verify`` speak only this small protocol, so the
same commit logic runs against S3 (:mod:`runner.storage.s3`) and a local directory
(:mod:`runner.storage.local`), and tests can wrap a real store to inject faults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from runner.errors import StorageError


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it.

    Attributes:
        key: The key relative to the store's root.
        size: Size in bytes.
        etag: The store's version tag (S3 ETag, or size+mtime for files); changes on rewrite.
    """

    key: str
    size: int
    etag: str | None = None


class ObjectNotFoundError(StorageError):
    """The object does not exist (its URI is in the message)."""


class ObjectStore(Protocol):
    """A flat key → bytes store rooted at a bucket or a directory.

    Keys are ``/``-separated relative paths checked by :func:`runner.storage.keys.check_key`.
    Every method raises :class:`runner.errors.StorageError` (with the object's URI in the
    message) when the store is unreachable or denies access, after bounded retries.
    """

    def uri(self, key: str) -> str:
        """The full URI of ``key`` (``s3://bucket/key`` or ``file:///dir/key``) for messages."""
        ...

    def put(self, key: str, source: Path | bytes) -> ObjectInfo:
        """Write a local file or bytes to ``key`` atomically (readers never see a partial one)."""
        ...

    def read(self, key: str) -> bytes:
        """The whole object (meant for small ones: manifests, pointers).

        Raises:
            ObjectNotFoundError: if ``key`` does not exist.
        """
        ...

    def download(self, key: str, dest: Path) -> None:
        """Copy ``key`` to the local file ``dest`` (written to a temp file, then renamed).

        Raises:
            ObjectNotFoundError: if ``key`` does not exist.
        """
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Size and tag of ``key``, or ``None`` if it does not exist."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""
        ...
