"""The user's own local files, read so that none of them can hang, flood or crash a command.

The spec, the data, the model's ``config.json``, tokenizer files and chat template, a plan or
values file: every one is the user's input, and every way it can be wrong is a user mistake
(exit code 2 naming the file and the fix), never an internal error (exit 1, which the Job
retries on a GPU node) and never a hang:

* a file is opened without blocking and must be a regular file, so a FIFO or a device (a
  ``data.jsonl`` symlinked to ``/dev/zero``) is refused instead of blocking or filling memory;
* it is read up to a limit where one makes sense (a ``config.json`` is kilobytes, not 40 MB);
* ``PermissionError``, ``IsADirectoryError`` and every other ``OSError`` become one
  ``path: problem; fix`` line (:func:`access_problem`);
* a model directory is checked as a whole before any library reads a file of it
  (:func:`check_model_dir`): each of its model files must be a readable regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from runner.errors import RunnerError, SpecError

MODEL_FILE_SUFFIXES = (
    ".json",
    ".safetensors",
    ".bin",
    ".pt",
    ".model",
    ".jinja",
    ".tiktoken",
    ".txt",
    ".py",
    ".gguf",
)
"""Names that libraries read from a model directory (config, weights, tokenizer, template)."""


def access_problem(error: OSError, *, directory: bool = False) -> str:
    """What is wrong with a path the runner could not open, and how to fix it."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    who = f"the runner's user (uid {uid})" if uid is not None else "the runner's user"
    if isinstance(error, PermissionError):
        fix = "chmod a+rx on the directory" if directory else "chmod a+r on the file"
        return f"permission denied; make it readable by {who} ({fix} and a+x on its parents)"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not a file; name the file itself"
    if isinstance(error, NotADirectoryError):
        return "a part of the path is a file, not a directory; check the path"
    if isinstance(error, FileNotFoundError):
        return "no such file or directory (a broken symlink?); check the path"
    if error.errno == errno.ELOOP:
        return "too many levels of symbolic links; check the path"
    return f"cannot read: {error.strerror or error}"


def read_file(
    path: Path,
    label: str | None = None,
    *,
    max_bytes: int | None = None,
    what: str = "file",
    error: type[RunnerError] = SpecError,
) -> bytes:
    """The bytes of a regular file, never blocking and never more than ``max_bytes``.

    Args:
        path: The file.
        label: How messages name it (default: the path).
        max_bytes: Refuse a larger file (None: no limit).
        what: What the file is, for the size message ("config.json", "tokenizer file").
        error: The error type raised (``SpecError``; ``DataError`` for datasets), exit 2.

    Raises:
        RunnerError: ``error``, naming the file: unreadable, not a regular file, too large.
    """
    where = label or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{where}: {access_problem(e)}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{where}: is a directory, not a file; name the file itself")
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{where}: not a regular file (a FIFO, socket or device); put the {what} in a "
                "plain file"
            )
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(
                f"{where}: {st.st_size} bytes is too large for a {what} (limit {max_bytes} "
                "bytes)"
            )
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{where}: {access_problem(e)}") from e
    if max_bytes is not None and len(data) > max_bytes:  # it grew while being read
        raise error(f"{where}: larger than the limit of {max_bytes} bytes for a {what}")
    return data


def is_file(path: Path, label: str | None = None) -> bool:
    """``Path.is_file``, except that a path the runner may not look at is an error, not False.

    Raises:
        SpecError: the path (or a directory above it) is not accessible (exit code 2).
    """
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise SpecError(f"{label or path}: {access_problem(e, directory=True)}") from e


def check_model_dir(path: Path, label: str) -> None:
    """Refuse a model directory with a file no library could read, before any library tries.

    Every entry whose name ends in one of :data:`MODEL_FILE_SUFFIXES` must be a regular file
    (following symlinks, as the Hugging Face cache uses them) that can be opened for reading;
    the directory itself must be listable. A missing directory is left to the caller, which
    says what a model directory holds.

    Raises:
        SpecError: naming the directory or the file and the fix (exit code 2).
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise SpecError(f"{label}: {path}: {access_problem(e, directory=True)}") from e
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        with os.scandir(path) as it:
            names = sorted(entry.name for entry in it)
    except OSError as e:
        raise SpecError(f"{label}: {path}: {access_problem(e, directory=True)}") from e
    for name in names:
        if not name.endswith(MODEL_FILE_SUFFIXES):
            continue
        file = path / name
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise SpecError(f"{label}: {file}: {access_problem(e)}") from e
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if stat.S_ISDIR(mode):
            raise SpecError(
                f"{label}: {file}: is a directory, not a file; the model's files must be "
                "plain files (copy the model again)"
            )
        if not stat.S_ISREG(mode):
            raise SpecError(
                f"{label}: {file}: not a regular file (a FIFO, socket or device); the model's "
                "files must be plain files (copy the model again)"
            )
