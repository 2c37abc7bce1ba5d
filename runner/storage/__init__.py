"""Object storage: one interface, a ``file://`` and an ``s3://`` backend, and safe keys.

Callers name locations by URI; :func:`open_store` checks the scheme against an allow-list and
returns the store plus the key prefix inside it. :func:`fetch` brings an ``s3://`` model or
dataset to local disk for the trainer. boto3 is imported only by :mod:`runner.storage.s3`,
and only when an ``s3://`` URI is opened.
"""

from __future__ import annotations

from runner.storage.factory import open_store
from runner.storage.keys import (
    ALLOWED_SCHEMES,
    StorageUri,
    UnsafeKeyError,
    check_key,
    join_key,
    parse_uri,
)
from runner.storage.local import LocalStore
from runner.storage.ports import ObjectInfo, ObjectNotFoundError, ObjectStore
from runner.storage.transfer import fetch

__all__ = [
    "ALLOWED_SCHEMES",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "StorageUri",
    "UnsafeKeyError",
    "check_key",
    "fetch",
    "join_key",
    "open_store",
    "parse_uri",
]
