"""Token lengths of a local data file for ``qlora plan --data`` (no torch).

The model's own tokenizer is used when the spec's ``model.source`` is a local directory with
a ``tokenizer.json`` and the ``tokenizers`` package is installed; otherwise the lengths are
``characters / CHARS_PER_TOKEN`` (:mod:`runner.plan.lengths`). The plan's reasons say which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import DataError
from runner.plan.lengths import CHARS_PER_TOKEN, LengthProfile, profile, read_text_lengths
from runner.spec import JobSpec


def local_tokenizer(source: str) -> Any | None:
    """A ``tokenizers.Tokenizer`` from a local model directory, or None."""
    path = Path(source.removeprefix("file://"))
    if "://" in source and not source.startswith("file://"):
        return None
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception:  # a broken tokenizer.json: fall back to the approximation
        return None


def lengths_for_plan(spec: JobSpec, data: str) -> LengthProfile:
    """The data file's token lengths, capped at ``training.max_seq_length``.

    Raises:
        DataError: the file is missing, unreadable or not JSON (``path: message``).
    """
    path = Path(data)
    if not path.exists():  # anything else there (a FIFO, a directory) is named by the reader
        raise DataError(f"{data}: no such data file (qlora plan --data takes a local file)")
    tok = local_tokenizer(spec.spec.model.source)
    if tok is not None:

        def count(text: str) -> int:
            return len(tok.encode(text).ids)

        lengths = read_text_lengths(path, count)
        source = "the model's tokenizer"
    else:
        lengths = read_text_lengths(path)
        source = f"characters / {CHARS_PER_TOKEN:g} (no local tokenizer)"
    if not lengths:
        raise DataError(f"{data}: the data file has no rows")
    return profile(lengths, spec.spec.training.max_seq_length, source)
