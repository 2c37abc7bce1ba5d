"""Opening a store from a URI, behind the scheme allow-list.

Kept apart from the package's ``__init__`` so that :mod:`runner.storage.transfer` and the
publisher can import it without a cycle; boto3 is imported only when an ``s3://`` URI is opened.
"""

from __future__ import annotations

from pathlib import Path

from runner.settings import Settings
from runner.storage.keys import StorageUri, parse_uri
from runner.storage.local import LocalStore
from runner.storage.ports import ObjectStore


def open_store(uri: str | StorageUri, settings: Settings) -> tuple[ObjectStore, str]:
    """The store behind ``uri`` and the key prefix inside it.

    ``s3://bucket/a/b`` gives the bucket's store and ``'a/b'``; ``file:///data/out`` gives a
    store rooted at ``/data/out`` and ``''``.

    Raises:
        UnsafeKeyError: for a scheme off the allow-list or an unsafe key (exit code 2).
    """
    parsed = uri if isinstance(uri, StorageUri) else parse_uri(uri)
    if parsed.scheme == "s3":
        from runner.storage.s3 import S3Store

        return S3Store(parsed.root, settings), parsed.key
    return LocalStore(Path(parsed.root)), parsed.key
