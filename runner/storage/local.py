"""A ``file://`` object store: a directory tree on a local or mounted file system.

It exists for the embedded CPU example, for laptops and for shared volumes (NFS, a PVC), and it
keeps the same guarantees as S3: a reader never sees a partially written object. Each write
goes to a temporary file in the target directory, is fsynced, then atomically renamed over the
final name (``os.replace``), and the directory is fsynced so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from runner.errors import StorageError
from runner.storage.keys import check_key
from runner.storage.ports import ObjectInfo, ObjectNotFoundError

TMP_PREFIX = ".qlora-tmp-"
"""Name prefix of in-flight temporary files; :meth:`LocalStore.list` never returns them."""

_CHUNK = 1 << 20


class LocalStore:
    """An :class:`~runner.storage.ports.ObjectStore` rooted at a local directory.

    Args:
        root: The directory; created on the first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()

    def uri(self, key: str) -> str:
        """``file://<root>/<key>``."""
        return f"file://{self.root}/{key}" if key else f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # Defence in depth against symlinks placed inside the root.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StorageError(f"{self.uri(key)}: resolves outside the store root {self.root}")
        return path

    def put(self, key: str, source: Path | bytes) -> ObjectInfo:
        """Write atomically: temp file in the same directory, fsync, rename, fsync directory."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    if isinstance(source, bytes):
                        out.write(source)
                    else:
                        with source.open("rb") as src:
                            shutil.copyfileobj(src, out, _CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                raise
            _fsync_dir(path.parent)
        except OSError as e:
            raise _translate(e, self.uri(key), "write") from e
        info = self.head(key)
        if info is None:  # pragma: no cover - only if another process deletes it at once
            raise StorageError(f"{self.uri(key)}: vanished right after it was written")
        return info

    def read(self, key: str) -> bytes:
        """The whole file."""
        try:
            return self._path(key).read_bytes()
        except OSError as e:
            raise _translate(e, self.uri(key), "read") from e

    def download(self, key: str, dest: Path) -> None:
        """Copy to ``dest`` through a temp file and a rename."""
        src = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                    shutil.copyfileobj(inp, out, _CHUNK)
                os.replace(tmp_name, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                raise
        except OSError as e:
            raise _translate(e, self.uri(key), "download") from e

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ``size-mtime_ns`` tag, or ``None``."""
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _translate(e, self.uri(key), "stat") from e
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_size:x}-{st.st_mtime_ns:x}")

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Regular files whose key starts with ``prefix`` (temp files left out), by key."""
        if prefix:
            check_key(prefix.rstrip("/"))
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        found: list[ObjectInfo] = []
        try:
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(TMP_PREFIX):
                        continue
                    key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        st = (Path(dirpath) / name).stat()
                        found.append(
                            ObjectInfo(key, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")
                        )
        except OSError as e:
            raise _translate(e, self.uri(prefix), "list") from e
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        """Unlink the file; a missing file is fine."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise _translate(e, self.uri(key), "delete") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(e: OSError, uri: str, action: str) -> StorageError:
    if isinstance(e, FileNotFoundError) and action in ("read", "download"):
        return ObjectNotFoundError(f"{uri}: no such object")
    reason = {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOSPC: "no space left on device",
        errno.EROFS: "read-only file system",
        errno.EDQUOT: "disk quota exceeded",
    }.get(e.errno or 0, e.strerror or type(e).__name__)
    return StorageError(f"{uri}: {action} failed: {reason}")
