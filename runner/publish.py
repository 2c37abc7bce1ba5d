"""Publishing a verified adapter to object storage, and checking a published one.

Layout under the spec's ``output.uri``::

    <output>/runs/<run-id>/adapter_model.safetensors, adapter_config.json, ...
    <output>/runs/<run-id>/manifest.json   # written last: the commit marker
    <output>/latest.json                   # {run_id, manifest sha256}: updated after the commit

Every run writes under its own prefix, so a second run never mixes files with the first and
a failed run leaves the previous adapter and ``latest.json`` untouched. If two runs finish at
the same moment, the last to write ``latest.json`` wins; both run prefixes stay complete. The
commit itself (upload, read back and re-hash, manifest last) is
:func:`runner.storage.commit.commit_directory`, shared with checkpoints.
:func:`verify_published` is what ``qlora verify`` runs.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.errors import VerificationError
from runner.settings import Settings
from runner.storage.commit import (
    MANIFEST_NAME,
    FileEntry,
    commit_directory,
    inspect_committed,
    utc_now,
)
from runner.storage.factory import open_store
from runner.storage.keys import UnsafeKeyError, join_key, parse_uri
from runner.storage.local import LocalStore
from runner.storage.ports import ObjectStore

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
LATEST_NAME = "latest.json"
MAX_POINTER_BYTES = 64 * 1024
"""latest.json names one run; anything this large is not one."""
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class PublishResult:
    """Where an adapter was published.

    Attributes:
        run_id: The run's id (its prefix is ``<output>/runs/<run_id>/``).
        run_uri: URI of the run prefix.
        manifest_uri: URI of the committed ``manifest.json``.
        manifest_sha256: sha256 of the manifest bytes (also in ``latest.json``).
        latest_uri: URI of the updated ``latest.json``.
        files: Every published file with sha256 and size.
    """

    run_id: str
    run_uri: str
    manifest_uri: str
    manifest_sha256: str
    latest_uri: str
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the files' sizes."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class VerifyReport:
    """The result of a successful :func:`verify_published`.

    Attributes:
        run_id: The verified run (from the manifest, else the prefix name).
        run_uri: URI of the run prefix.
        manifest_uri: URI of the manifest.
        manifest_sha256: sha256 of the manifest bytes.
        files: Every file checked (present, size and sha256 match).
        via_latest: ``True`` when the URI was an output root and ``latest.json`` was followed.
        extra: URIs of objects in the run prefix that the manifest does not list.
        manifest: The whole manifest document.
    """

    run_id: str
    run_uri: str
    manifest_uri: str
    manifest_sha256: str
    files: tuple[FileEntry, ...]
    via_latest: bool
    extra: tuple[str, ...]
    manifest: Mapping[str, Any]

    @property
    def total_bytes(self) -> int:
        """Sum of the files' sizes."""
        return sum(f.size for f in self.files)


def new_run_id(spec_hash: str | None = None, now: datetime | None = None) -> str:
    """A unique, sortable run id: ``20261128T101500Z-<spec hash 8>-<6 random hex>``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    parts = [stamp, (spec_hash or "")[:8], secrets.token_hex(3)]
    return "-".join(p for p in parts if p)


def publish_adapter(
    adapter_dir: Path,
    output_uri: str,
    metadata: Mapping[str, Any],
    settings: Settings,
    run_id: str | None = None,
) -> PublishResult:
    """Publish ``adapter_dir`` under ``<output_uri>/runs/<run_id>/`` and point latest at it.

    Args:
        adapter_dir: The saved, verified adapter (every file in it is published).
        output_uri: The spec's ``output.uri`` (``s3://bucket/prefix`` or ``file://path``).
        metadata: Manifest fields: base model id/revision/config hash, spec hash, dataset
            fingerprint, verification, training summary, library versions, ... The publisher
            adds ``format_version``, ``kind``, ``run_id``, ``created`` and ``files``.
        settings: S3 endpoint and retries.
        run_id: Defaults to :func:`new_run_id` with ``metadata["spec_hash"]``.

    Raises:
        StorageError: the store failed after retries (exit code 5); nothing was committed.
        VerificationError: a file read back differs; no manifest was written (exit code 4).
        UnsafeKeyError: ``output_uri`` or ``run_id`` is not safe (exit code 2).
    """
    store, prefix = open_store(output_uri, settings)
    return publish_to(store, prefix, adapter_dir, metadata, run_id)


def publish_to(
    store: ObjectStore,
    prefix: str,
    adapter_dir: Path,
    metadata: Mapping[str, Any],
    run_id: str | None = None,
) -> PublishResult:
    """:func:`publish_adapter` on an open store (lets tests wrap the store to inject faults)."""
    spec_hash = metadata.get("spec_hash")
    run_id = run_id or new_run_id(spec_hash if isinstance(spec_hash, str) else None)
    if not _RUN_ID_RE.fullmatch(run_id):
        raise UnsafeKeyError(f"{run_id!r}: run id must match {_RUN_ID_RE.pattern}")
    run_prefix = join_key(prefix, RUNS_DIR, run_id)
    document = {"kind": "adapter", "run_id": run_id, "created": utc_now(), **metadata}
    log.info("publishing %s to %s", adapter_dir, store.uri(run_prefix))
    committed = commit_directory(store, run_prefix, adapter_dir, document)
    latest_key = join_key(prefix, LATEST_NAME)
    latest = {
        "run_id": run_id,
        "manifest": join_key(RUNS_DIR, run_id, MANIFEST_NAME),
        "manifest_sha256": committed.manifest_sha256,
        "updated": utc_now(),
    }
    store.put(latest_key, (json.dumps(latest, indent=2) + "\n").encode())
    log.info(
        "published %d files (%d bytes) to %s",
        len(committed.files),
        committed.total_bytes,
        committed.uri,
        extra={"run_id": run_id, "manifest_sha256": committed.manifest_sha256},
    )
    return PublishResult(
        run_id=run_id,
        run_uri=committed.uri,
        manifest_uri=committed.manifest_uri,
        manifest_sha256=committed.manifest_sha256,
        latest_uri=store.uri(latest_key),
        files=committed.files,
    )


def verify_published(uri: str, settings: Settings) -> VerifyReport:
    """Re-check a published adapter: manifest valid, every file present with its size and hash.

    Args:
        uri: The output root (``latest.json`` is followed), a run prefix
            (``<output>/runs/<id>``), or a ``manifest.json`` / ``latest.json`` URI.
        settings: S3 endpoint and retries.

    Raises:
        VerificationError: listing every problem as ``<uri>: <problem>`` (exit code 4).
        StorageError: the store is unreachable or denies access (exit code 5).
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file" and Path(parsed.root).is_file():
        root = Path(parsed.root)
        store: ObjectStore = LocalStore(root.parent)
        key = root.name
    else:
        store, key = open_store(parsed, settings)
    return verify_in_store(store, key)


def verify_in_store(store: ObjectStore, key: str) -> VerifyReport:
    """:func:`verify_published` on an open store; ``key`` as the URI's key."""
    base, _, name = key.rpartition("/")
    if name == MANIFEST_NAME:
        return _verify_run(store, base, via_latest=False)
    if name == LATEST_NAME:
        return _follow_latest(store, base)
    if store.head(join_key(key, MANIFEST_NAME)) is not None:
        return _verify_run(store, key, via_latest=False)
    if store.head(join_key(key, LATEST_NAME)) is not None:
        return _follow_latest(store, key)
    raise VerificationError(
        f"{store.uri(key)}: nothing published here: no {MANIFEST_NAME} and no {LATEST_NAME} "
        "(an interrupted publish leaves no manifest)"
    )


def _follow_latest(store: ObjectStore, root: str) -> VerifyReport:
    latest_key = join_key(root, LATEST_NAME)
    uri = store.uri(latest_key)
    info = store.head(latest_key)
    if info is not None and info.size > MAX_POINTER_BYTES:
        raise VerificationError(f"{uri}: invalid pointer: {info.size} bytes (a pointer is tiny)")
    try:
        latest = json.loads(store.read(latest_key))
        run_id = str(latest["run_id"])
        manifest_key = join_key(root, str(latest["manifest"]))
        pinned = str(latest["manifest_sha256"])
    except (ValueError, KeyError, TypeError, UnsafeKeyError, RecursionError) as e:
        raise VerificationError(f"{uri}: invalid pointer: {e}") from e
    if not manifest_key.endswith(f"/{MANIFEST_NAME}"):
        raise VerificationError(f"{uri}: 'manifest' does not name a {MANIFEST_NAME}")
    extra_problems: list[str] = []
    report: VerifyReport | None = None
    try:
        report = _verify_run(store, manifest_key.rpartition("/")[0], via_latest=True)
    except VerificationError as e:
        extra_problems = list(e.details)
    if report is not None and report.manifest_sha256 != pinned:
        extra_problems.append(
            f"{report.manifest_uri}: sha256 differs from the one pinned in {uri} (run {run_id})"
        )
    if extra_problems or report is None:
        raise VerificationError(f"{uri}: run {run_id} failed verification", extra_problems)
    return report


def _verify_run(store: ObjectStore, run_prefix: str, *, via_latest: bool) -> VerifyReport:
    committed, problems = inspect_committed(store, run_prefix, rehash=True)
    if committed is None or problems:
        raise VerificationError(f"{store.uri(run_prefix)}: verification failed", problems)
    listed = {join_key(committed.prefix, f.path) for f in committed.files}
    listed.add(join_key(committed.prefix, MANIFEST_NAME))
    listing = store.list(f"{committed.prefix}/" if committed.prefix else "")
    extra = tuple(store.uri(o.key) for o in listing if o.key not in listed)
    run_id = committed.manifest.get("run_id")
    return VerifyReport(
        run_id=str(run_id) if run_id else committed.prefix.rpartition("/")[2],
        run_uri=committed.uri,
        manifest_uri=committed.manifest_uri,
        manifest_sha256=committed.manifest_sha256,
        files=committed.files,
        via_latest=via_latest,
        extra=extra,
        manifest=committed.manifest,
    )
