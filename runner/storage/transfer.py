"""Bringing models and datasets from object storage to local disk.

The trainer reads files, not objects. :func:`fetch` turns a spec's ``model.source`` or
``dataset.sources`` entry into a local path: a local path is returned as it is, one ``s3://``
object becomes one file, and an ``s3://`` prefix (a model directory) becomes a directory. A
small state file remembers each object's tag so a restarted pod (after preemption) does not
download a 16 GB model again unless it changed. Object names from the bucket are checked as
keys before they become local paths, so a hostile listing cannot write outside ``dest_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from runner.errors import StorageError
from runner.settings import Settings
from runner.storage.factory import open_store
from runner.storage.keys import check_key, parse_uri
from runner.storage.ports import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

STATE_FILE = ".qlora-fetch.json"
"""Written in ``dest_dir``: ``{relative path: object tag}`` of what was downloaded."""


def fetch(uri: str, dest_dir: Path, settings: Settings) -> Path:
    """A local path holding ``uri``'s content, downloading it if it is remote.

    Args:
        uri: A local path, ``file://path``, ``s3://bucket/key`` (one object) or
            ``s3://bucket/prefix`` (every object under ``prefix/``).
        dest_dir: Where remote content goes; created if needed. Objects under a prefix are
            placed directly in it, keeping their relative paths.
        settings: S3 endpoint, region and retries.

    Returns:
        The local path: the path itself for local input, ``dest_dir/<name>`` for one object,
        ``dest_dir`` for a prefix.

    Raises:
        StorageError: nothing exists at ``uri``, or the store is unreachable (exit code 5).
        UnsafeKeyError: the URI or an object name under it is unsafe (exit code 2).
    """
    if "://" not in uri:
        return Path(uri)
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.root)
    store, key = open_store(parsed, settings)
    state = _load_state(dest_dir)
    if key:
        info = store.head(key)
        if info is not None:
            name = check_key(key.rsplit("/", 1)[-1])
            _download(store, info, dest_dir, name, state)
            _save_state(dest_dir, state)
            return dest_dir / name
    prefix = f"{key}/" if key else ""
    objects = [o for o in store.list(prefix) if not o.key.endswith("/")]
    if not objects:
        raise StorageError(f"{uri}: no object and no objects under it; check the URI")
    for info in objects:
        _download(store, info, dest_dir, check_key(info.key[len(prefix) :]), state)
    _save_state(dest_dir, state)
    log.info("fetched %s (%d objects) to %s", uri, len(objects), dest_dir)
    return dest_dir


def _download(
    store: ObjectStore, info: ObjectInfo, dest_dir: Path, rel: str, state: dict[str, str]
) -> None:
    dest = dest_dir / rel
    tag = f"{info.size}:{info.etag}"
    if state.get(rel) == tag and dest.is_file() and dest.stat().st_size == info.size:
        log.debug("%s is up to date", dest)
        return
    store.download(info.key, dest)
    state[rel] = tag


def _load_state(dest_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((dest_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_state(dest_dir: Path, state: dict[str, str]) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
