"""The data's token lengths, and how rows are laid out into micro batches: pure code.

Real fine-tuning data is a few hundred tokens a row with a long tail, not rows of exactly
``max_seq_length``. Unsloth trains padding-free (the rows of a micro batch are concatenated
into one sequence), so its memory and time per micro batch follow the *tokens in the micro
batch*, not ``micro_batch x max_seq_length``. This module gives the planner those token
counts.

**The row order** (:func:`batch_order`), the same in ``qlora plan --data`` and in the pod, so
the token counts the plan is sized for are the ones the trainer sees:

1. the rows are shuffled with ``training.seed`` (one permutation per epoch, seed + epoch,
   concatenated);
2. the shuffled rows are cut into optimizer steps of ``micro x accumulation`` rows (the
   effective batch): the rows of each step are exactly those a plain shuffled loader would
   give that step, so the optimisation is unchanged;
3. inside a step, the rows are dealt to its ``accumulation`` micro batches of ``micro`` rows
   each so that the token counts are as even as possible: longest row first, each to the micro
   batch with the fewest tokens that still has room (padding-free, balanced token budgets).
   For a padded backend (transformers without FlashAttention) the rows are instead grouped
   by length (sorted, consecutive chunks), which minimises the padding.

The gradient of a step does not depend on how its rows are split among its micro batches:
the loss is normalised by the step's loss tokens (transformers' ``num_items_in_batch``), so
the split changes memory and speed only.

**Lengths without a tokenizer.** ``qlora plan --data`` uses the model's tokenizer when it can
load one locally (``tokenizer.json`` beside a local model); otherwise each row's length is its
JSON line's characters divided by :data:`CHARS_PER_TOKEN` (English text with a BPE tokenizer
of a 32k-128k vocabulary: 3.5-4.5 characters a token; 3.6 is on the long side, so the estimate
errs toward more tokens). The pod always re-plans from the real token ids (preflight).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.errors import DataError
from runner.local_files import read_file

CHARS_PER_TOKEN = 3.6
"""Characters per token assumed when no tokenizer is available (see the module docstring)."""


@dataclass(frozen=True)
class LengthProfile:
    """Token lengths of the training rows, each capped at ``max_seq_length``.

    Attributes:
        lengths: One entry per training row, in the data's own order.
        max_seq_length: The cap applied.
        source: How the lengths were obtained: ``'tokenizer'``, ``'chars/3.6'`` or
            ``'preflight'`` (the real token ids in the pod).
    """

    lengths: tuple[int, ...]
    max_seq_length: int
    source: str

    @property
    def rows(self) -> int:
        """Number of rows."""
        return len(self.lengths)

    @property
    def mean(self) -> float:
        """Mean tokens per row."""
        return sum(self.lengths) / len(self.lengths) if self.lengths else 0.0

    def quantile(self, q: float) -> int:
        """The ``q`` quantile of the lengths (nearest rank)."""
        if not self.lengths:
            return 0
        s = sorted(self.lengths)
        return s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))]

    def summary(self) -> str:
        """One line for plan reasons and logs."""
        return (
            f"{self.rows} rows, mean {self.mean:.0f} tokens, p50 {self.quantile(0.5)}, "
            f"p90 {self.quantile(0.9)}, max {max(self.lengths, default=0)} "
            f"(cap {self.max_seq_length}; lengths from {self.source})"
        )


def profile(lengths: Iterable[int], max_seq_length: int, source: str) -> LengthProfile:
    """A :class:`LengthProfile` of ``lengths`` capped at ``max_seq_length`` (zeros dropped)."""
    capped = tuple(min(int(n), max_seq_length) for n in lengths if int(n) > 0)
    return LengthProfile(capped, max_seq_length, source)


def batch_order(
    lengths: Sequence[int],
    micro_batch: int,
    accumulation: int,
    *,
    seed: int,
    epochs: int = 1,
    padding_free: bool = True,
) -> list[list[int]]:
    """Row indices grouped into micro batches, in training order (see the module docstring).

    Args:
        lengths: Token length of each row.
        micro_batch: Rows per micro batch.
        accumulation: Micro batches per optimizer step.
        seed: The spec's ``training.seed``.
        epochs: Whole passes to lay out (each with its own shuffle).
        padding_free: Balance token counts (True) or group by length (False, padded).

    Returns:
        A list of micro batches, each a list of row indices; every ``accumulation``
        consecutive micro batches form one optimizer step. A final short step keeps its rows.
    """
    perm: list[int] = []
    for epoch in range(max(1, epochs)):
        p = list(range(len(lengths)))
        random.Random(seed + epoch).shuffle(p)
        perm.extend(p)
    step_rows = micro_batch * accumulation
    out: list[list[int]] = []
    for start in range(0, len(perm), step_rows):
        out.extend(split_step(perm[start : start + step_rows], lengths, micro_batch, padding_free))
    return out


def split_step(
    step: list[int], lengths: Sequence[int], micro_batch: int, padding_free: bool
) -> list[list[int]]:
    """The rows of one optimizer step dealt to micro batches of ``micro_batch`` rows."""
    k = -(-len(step) // micro_batch)
    by_len = sorted(step, key=lambda i: (-lengths[i], i))
    if not padding_free:
        return [by_len[j * micro_batch : (j + 1) * micro_batch] for j in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    tokens = [0] * k
    for i in by_len:
        j = min((b for b in range(k) if len(bins[b]) < micro_batch), key=lambda b: tokens[b])
        bins[j].append(i)
        tokens[j] += lengths[i]
    # Largest micro batch first: the first step already reaches the step's peak memory.
    return sorted(bins, key=lambda b: -sum(lengths[i] for i in b))


def micro_batch_tokens(
    lengths: Sequence[int], batches: Sequence[Sequence[int]], *, padding_free: bool = True
) -> list[int]:
    """Tokens each micro batch occupies (padded: rows x the longest row)."""
    if padding_free:
        return [sum(lengths[i] for i in b) for b in batches]
    return [len(b) * max((lengths[i] for i in b), default=0) for b in batches]


def peak_micro_batch_tokens(
    prof: LengthProfile,
    micro_batch: int,
    accumulation: int,
    *,
    seed: int,
    padding_free: bool = True,
) -> int:
    """The largest micro batch, in tokens, of the first epoch :func:`batch_order` lays out.

    Later epochs reshuffle; their peak differs from the first's by the luck of one step's
    rows, which the estimator's margin covers (the pod re-plans with the real lengths).
    """
    if not prof.lengths:
        return 0
    batches = batch_order(
        prof.lengths, micro_batch, accumulation, seed=seed, padding_free=padding_free
    )
    return max(micro_batch_tokens(prof.lengths, batches, padding_free=padding_free))


def read_text_lengths(path: Path, tokenize: object | None = None) -> list[int]:
    """Per-row token lengths of a JSON Lines / JSON file.

    Each row is counted as the text the model would see: every string value of the record
    joined (chat ``messages`` contents, ``prompt``/``completion``, ``text``...), so template
    tokens are not counted (a few per message; the preflight re-plan counts them). With
    ``tokenize`` (a callable: text -> number of tokens) it is exact for those strings;
    without, ``characters / CHARS_PER_TOKEN`` rounded up.

    Raises:
        DataError: the file cannot be read or a row is not JSON (``path: row N: ...``).
    """
    raw = read_file(path, what="dataset", error=DataError)  # a regular file, never a FIFO
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; re-save it as UTF-8") from e
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            records = data if isinstance(data, list) else None
            if records is None:
                raise DataError(f"{path}: a .json dataset must hold a list of rows")
        else:
            records = []
            for no, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except (ValueError, RecursionError) as e:
                        raise DataError(f"{path}: row {no}: not JSON ({e})") from e
    except (ValueError, RecursionError) as e:  # an integer too long, nesting too deep
        raise DataError(f"{path}: not JSON ({e})") from e
    out = []
    for rec in records:
        text = "\n".join(_strings(rec))
        if tokenize is not None:
            out.append(int(tokenize(text)))  # type: ignore[operator]
        else:
            out.append(max(1, math.ceil(len(text) / CHARS_PER_TOKEN)))
    return out


def _strings(value: object) -> Iterable[str]:
    # Iterative: a row nested hundreds of levels deep (valid JSON) costs no stack.
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
