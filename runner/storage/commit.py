"""The commit protocol: files first, re-hashed from the store, ``manifest.json`` last.

A directory (a trained adapter, or a checkpoint) is "committed" under a key prefix when that
prefix holds a ``manifest.json`` listing every file with its sha256 and size. The manifest is
written only after every file has been uploaded *and read back from the store and re-hashed*,
so a crash, a kill -9 or a storage outage at any point leaves either a complete, verifiable
directory or no manifest at all, and readers treat a prefix without a manifest as absent.
Each prefix is written once: committing onto an existing manifest is refused.

The publisher (:mod:`runner.publish`) and the checkpointer both use these functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.errors import StorageError, VerificationError
from runner.storage.keys import UnsafeKeyError, check_key, join_key, relative_key
from runner.storage.ports import ObjectStore

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""A manifest lists files and metadata (kilobytes); anything this large is not one."""
"""Version of the manifest layout; readers refuse newer ones."""

_RESERVED = frozenset({"format_version", "files"})
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """One committed file: its path relative to the prefix, sha256 (hex) and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Committed:
    """A committed prefix as read or written.

    Attributes:
        uri: URI of the prefix (``s3://bucket/.../runs/<id>``).
        prefix: The key prefix inside the store.
        manifest_uri: URI of its ``manifest.json``.
        manifest_sha256: sha256 of the manifest's bytes (what ``latest.json`` pins).
        files: Every file, as listed in the manifest.
        manifest: The whole manifest document (metadata included).
    """

    uri: str
    prefix: str
    manifest_uri: str
    manifest_sha256: str
    files: tuple[FileEntry, ...]
    manifest: Mapping[str, Any]

    @property
    def total_bytes(self) -> int:
        """Sum of the files' sizes."""
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def scan_directory(local_dir: Path) -> list[FileEntry]:
    """Every regular file under ``local_dir`` (symlinks followed), hashed, sorted by path.

    Raises:
        StorageError: if the directory is missing or holds no file.
    """
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory; nothing to commit")
    entries = [
        FileEntry(relative_key(p, local_dir), sha256_file(p), p.stat().st_size)
        for p in sorted(local_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    ]
    if not entries:
        raise StorageError(f"{local_dir}: holds no file; nothing to commit")
    return entries


def store_digest(store: ObjectStore, key: str, scratch: Path) -> tuple[str, int]:
    """Read ``key`` back from the store into ``scratch`` and return (sha256, size)."""
    tmp = scratch / "readback"
    store.download(key, tmp)
    try:
        return sha256_file(tmp), tmp.stat().st_size
    finally:
        tmp.unlink(missing_ok=True)


def commit_directory(
    store: ObjectStore,
    prefix: str,
    local_dir: Path,
    metadata: Mapping[str, Any],
) -> Committed:
    """Upload ``local_dir`` under ``prefix``, re-hash every file from the store, then commit.

    Args:
        store: Where to write.
        prefix: The key prefix (a run or checkpoint directory); must not be committed yet.
        local_dir: The files to commit (``manifest.json`` in it is ignored).
        metadata: JSON-serialisable fields stored at the manifest's top level
            (``format_version`` and ``files`` are reserved).

    Returns:
        The committed prefix.

    Raises:
        StorageError: the store failed (after retries) or ``prefix`` is already committed.
        VerificationError: a file read back from the store differs from the local one; no
            manifest is written.
    """
    clash = _RESERVED & set(metadata)
    if clash:
        raise ValueError(f"metadata must not set reserved manifest fields: {sorted(clash)}")
    prefix = check_key(prefix.strip("/"))
    manifest_key = join_key(prefix, MANIFEST_NAME)
    if store.head(manifest_key) is not None:
        raise StorageError(
            f"{store.uri(manifest_key)}: already committed; a prefix is written only once"
        )
    entries = scan_directory(local_dir)
    for entry in entries:
        info = store.put(join_key(prefix, entry.path), local_dir / entry.path)
        if info.size != entry.size:
            raise VerificationError(
                f"{store.uri(info.key)}: stored size {info.size} != local size {entry.size}"
            )
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qlora-readback-") as scratch:
        for entry in entries:
            key = join_key(prefix, entry.path)
            sha, size = store_digest(store, key, Path(scratch))
            if sha != entry.sha256 or size != entry.size:
                problems.append(f"{store.uri(key)}: read back differs from the local file")
    if problems:
        raise VerificationError(
            f"{store.uri(prefix)}: upload corrupted; no manifest written", problems
        )
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **metadata,
        "files": [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in entries],
    }
    data = (json.dumps(document, indent=2, sort_keys=False, default=str) + "\n").encode()
    store.put(manifest_key, data)
    return Committed(
        uri=store.uri(prefix),
        prefix=prefix,
        manifest_uri=store.uri(manifest_key),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        files=tuple(entries),
        manifest=document,
    )


def read_committed(store: ObjectStore, prefix: str, *, rehash: bool = True) -> Committed:
    """Read and check a committed prefix: manifest valid, every file present and intact.

    Args:
        store: Where to read.
        prefix: The committed prefix.
        rehash: Download and re-hash every file (else: check presence and size only).

    Raises:
        VerificationError: listing *every* problem (missing manifest, missing file, size or
            sha256 mismatch), each as ``<uri>: <problem>``.
        StorageError: the store is unreachable or denies access.
    """
    committed, problems = inspect_committed(store, prefix, rehash=rehash)
    if problems or committed is None:
        raise VerificationError(f"{store.uri(prefix)}: verification failed", problems)
    return committed


def inspect_committed(
    store: ObjectStore, prefix: str, *, rehash: bool = True
) -> tuple[Committed | None, list[str]]:
    """Like :func:`read_committed` but return the problems instead of raising.

    Returns:
        The committed prefix (``None`` if the manifest is missing or invalid) and a list of
        ``<uri>: <problem>`` lines, empty when everything checks out.
    """
    prefix = check_key(prefix.strip("/"), allow_empty=True)
    manifest_key = join_key(prefix, MANIFEST_NAME)
    info = store.head(manifest_key)
    if info is None:
        return None, [f"{store.uri(manifest_key)}: missing (nothing committed here)"]
    if info.size > MAX_MANIFEST_BYTES:  # not read: a tampered manifest must not fill memory
        return None, [
            f"{store.uri(manifest_key)}: invalid manifest: {info.size} bytes (limit "
            f"{MAX_MANIFEST_BYTES}); not a manifest this runner wrote"
        ]
    data = store.read(manifest_key)
    try:
        document, entries = parse_manifest(data)
    except ValueError as e:
        return None, [f"{store.uri(manifest_key)}: invalid manifest: {e}"]
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qlora-verify-") as scratch:
        for entry in entries:
            key = join_key(prefix, entry.path)
            uri = store.uri(key)
            info = store.head(key)
            if info is None:
                problems.append(f"{uri}: missing")
            elif info.size != entry.size:
                problems.append(f"{uri}: size mismatch (manifest {entry.size}, store {info.size})")
            elif rehash:
                sha, _ = store_digest(store, key, Path(scratch))
                if sha != entry.sha256:
                    problems.append(
                        f"{uri}: sha256 mismatch (manifest {entry.sha256[:12]}…, store {sha[:12]}…)"
                    )
    committed = Committed(
        uri=store.uri(prefix),
        prefix=prefix,
        manifest_uri=store.uri(manifest_key),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        files=tuple(entries),
        manifest=document,
    )
    return committed, problems


def parse_manifest(data: bytes) -> tuple[dict[str, Any], list[FileEntry]]:
    """Parse and validate a manifest's bytes.

    Raises:
        ValueError: naming the first invalid field.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:  # not UTF-8/JSON, a huge integer, too deep
        raise ValueError(f"not JSON ({e})") from e
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    version = document.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"format_version {version!r} is not supported (max {FORMAT_VERSION})")
    files = document.get("files")
    if not isinstance(files, list) or not files:
        raise ValueError("'files' must be a non-empty list")
    entries: list[FileEntry] = []
    for i, item in enumerate(files):
        if not isinstance(item, dict):
            raise ValueError(f"files[{i}] is not an object")
        path, sha, size = item.get("path"), item.get("sha256"), item.get("size")
        if not isinstance(path, str):
            raise ValueError(f"files[{i}].path is not a string")
        try:
            check_key(path)
        except UnsafeKeyError as e:
            raise ValueError(f"files[{i}].path: {e.message}") from e
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise ValueError(f"files[{i}].sha256 is not 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"files[{i}].size is not a non-negative integer")
        entries.append(FileEntry(path, sha, size))
    return document, entries


def restore_directory(store: ObjectStore, prefix: str, dest: Path) -> Committed:
    """Download a committed prefix into ``dest`` and check every file's sha256 locally.

    Used to resume from a checkpoint: a prefix without a valid manifest, or with a missing or
    corrupt file, raises, and the caller falls back to an older one.

    Raises:
        VerificationError: manifest missing or invalid, or a file differs (every problem).
        StorageError: the store failed.
    """
    committed, problems = inspect_committed(store, prefix, rehash=False)
    if committed is None or problems:
        raise VerificationError(f"{store.uri(prefix)}: cannot restore", problems)
    for entry in committed.files:
        key = join_key(committed.prefix, entry.path)
        target = dest / entry.path
        store.download(key, target)
        sha = sha256_file(target)
        if sha != entry.sha256:
            problems.append(f"{store.uri(key)}: sha256 mismatch after download")
    if problems:
        raise VerificationError(f"{store.uri(prefix)}: cannot restore", problems)
    return committed


def find_committed(store: ObjectStore, parent: str) -> list[str]:
    """Prefixes directly under ``parent`` that hold a ``manifest.json``, sorted by name.

    Prefixes without a manifest (an interrupted upload) are left out. Their files are not
    checked here; use :func:`read_committed` or :func:`restore_directory` on the one chosen.
    """
    base = f"{check_key(parent.strip('/'), allow_empty=True)}/" if parent.strip("/") else ""
    found = set()
    for info in store.list(base):
        rest = info.key[len(base) :]
        child, _, name = rest.partition("/")
        if name == MANIFEST_NAME and child:
            found.add(join_key(base, child))
    return sorted(found)


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (manifest ``created`` field)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def discard_committed(store: ObjectStore, prefix: str) -> int:
    """Delete a committed prefix safely: the manifest first, then its files.

    Removing the commit marker first means an interruption leaves an uncommitted prefix
    (ignored by readers), never a manifest that points at deleted files. Used to prune old
    checkpoints.

    Returns:
        The number of objects deleted.
    """
    prefix = check_key(prefix.strip("/"))
    store.delete(join_key(prefix, MANIFEST_NAME))
    objects = store.list(f"{prefix}/")
    for info in objects:
        store.delete(info.key)
    return len(objects) + 1
