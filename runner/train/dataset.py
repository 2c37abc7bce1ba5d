"""Reading the training data: local or ``s3://`` files in JSON Lines, JSON or Parquet.

Rows keep their coordinates (``dataset.sources[0]: row 17``) so every later error can point at
the exact record. The files are hashed as they are read: the dataset fingerprint goes into the
published manifest, so an adapter can always be traced back to the bytes it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import DataError, missing_extra
from runner.local_files import read_file
from runner.spec.model import DatasetSpec

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Row:
    """One record and where it came from.

    Attributes:
        where: ``dataset.sources[i]: row N`` (N counts records from 1).
        data: The record.
    """

    where: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class SourceFile:
    """A data file that was read, for the dataset fingerprint."""

    source: str
    sha256: str
    bytes: int
    rows: int


@dataclass(frozen=True)
class LoadedData:
    """Rows split into train and eval, with the fingerprint of the files they came from."""

    train: tuple[Row, ...]
    eval: tuple[Row, ...]
    files: tuple[SourceFile, ...]

    @property
    def fingerprint(self) -> str:
        """sha256 over every file's source name and content hash, in spec order."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.source}\0{f.sha256}\n".encode())
        return h.hexdigest()

    def manifest_entry(self) -> dict[str, Any]:
        """The ``dataset`` block of the published manifest."""
        return {
            "fingerprint_sha256": self.fingerprint,
            "files": [vars(f) for f in self.files],
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
        }


Fetcher = Callable[[str, Path], Path]
"""Turns an ``s3://`` URI into a local file (``runner.storage.fetch`` bound to settings)."""


def load_rows(spec: DatasetSpec, fetcher: Fetcher | None, *, seed: int) -> LoadedData:
    """Read every source, apply ``max_samples`` and split off the eval fraction.

    Args:
        spec: The dataset section of the job spec.
        fetcher: Downloads ``s3://`` sources; None when only local files are allowed.
        seed: Seed for the train/eval split.

    Raises:
        DataError: a file is missing, unreadable or malformed, or there are no rows (exit 2).
    """
    rows: list[Row] = []
    files: list[SourceFile] = []
    for i, source in enumerate(spec.sources):
        label = f"dataset.sources[{i}]"
        path = _local_path(source, label, fetcher)
        raw = _read_bytes(path, label, source)
        records = _parse(raw, path, label)
        files.append(SourceFile(source, hashlib.sha256(raw).hexdigest(), len(raw), len(records)))
        rows.extend(Row(f"{label}: row {n}", rec) for n, rec in enumerate(records, start=1))
        if spec.max_samples is not None and len(rows) >= spec.max_samples:
            break
    if spec.max_samples is not None:
        rows = rows[: spec.max_samples]
    if not rows:
        raise DataError(
            f"dataset.sources: no rows in {', '.join(spec.sources)}; the training data is empty"
        )
    train, held_out = split_rows(rows, spec.eval_fraction, seed)
    log.info(
        "dataset loaded: %d rows (%d train, %d eval) from %d file(s)",
        len(rows),
        len(train),
        len(held_out),
        len(files),
        extra={"rows": len(rows), "train_rows": len(train), "eval_rows": len(held_out)},
    )
    return LoadedData(tuple(train), tuple(held_out), tuple(files))


def split_rows(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic train/eval split: a seeded sample of ``fraction`` of the rows is held out.

    At least one row stays in training; with a positive fraction and two or more rows, at
    least one row is held out.
    """
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [r for i, r in enumerate(rows) if i in held]


def _local_path(source: str, label: str, fetcher: Fetcher | None) -> Path:
    if source.startswith("s3://"):
        if fetcher is None:
            raise DataError(f"{label}: {source}: s3:// sources need object storage settings")
        return fetcher(source, Path("datasets") / label.replace("[", "-").rstrip("]"))
    return Path(source.removeprefix("file://"))


def _read_bytes(path: Path, label: str, source: str) -> bytes:
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{label}: {source}: unsupported file type; use {', '.join(SUFFIXES)}")
    return read_file(path, f"{label}: {source}", what="dataset", error=DataError)


def _parse(raw: bytes, path: Path, label: str) -> list[Mapping[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parse_parquet(raw, label)
    text = _decode(raw, label, str(path), jsonl=suffix == ".jsonl")
    if suffix == ".jsonl":
        return _parse_jsonl(text, label)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json, as many hub exports are
            return _parse_jsonl(text, label)
        raise DataError(f"{label}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except (ValueError, RecursionError) as e:  # an integer too long, nesting too deep
        raise DataError(f"{label}: invalid JSON: {e}") from e
    if not isinstance(doc, list):
        raise DataError(f"{label}: a .json dataset must be a list of objects")
    return _check_objects(doc, label)


def _decode(raw: bytes, label: str, source: str, *, jsonl: bool) -> str:
    """UTF-8 text without a leading byte-order mark (editors on Windows write one).

    Raises:
        DataError: not UTF-8, naming the file, the line and (for JSON Lines) the row.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(
            f"{label}: {source}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
            "re-save it as UTF-8"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        at = f"line {line_no}"
        if jsonl:
            before = raw[: e.start].split(b"\n")
            row = sum(1 for line in before[:-1] if line.strip()) + 1
            at = f"row {row} ({at})"
        raise DataError(
            f"{label}: {source}: {at}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
            f"{column}); re-save the file as UTF-8"
        ) from e
    return text.removeprefix("\ufeff")


def _parse_jsonl(text: str, label: str) -> list[Mapping[str, Any]]:
    records: list[Any] = []
    # JSON Lines are separated by "\n" only: str.splitlines() would also split inside strings
    # at U+2028 and other characters JSON allows unescaped.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{label}: row {len(records) + 1} (line {line_no}): invalid JSON: {e.msg}"
            ) from e
        except (ValueError, RecursionError) as e:  # an integer too long, nesting too deep
            raise DataError(
                f"{label}: row {len(records) + 1} (line {line_no}): invalid JSON: {e}"
            ) from e
    return _check_objects(records, label)


def _parse_parquet(raw: bytes, label: str) -> list[Mapping[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise missing_extra("pyarrow", "train") from e
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{label}: not a readable Parquet file: {e}") from e
    return _check_objects(table.to_pylist(), label)


def _check_objects(records: Sequence[Any], label: str) -> list[Mapping[str, Any]]:
    for n, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            raise DataError(f"{label}: row {n}: expected an object, got {type(rec).__name__}")
    return list(records)
