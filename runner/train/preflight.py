"""Tokenize the formatted rows exactly as they will be trained, and refuse bad data early.

The preflight runs before any training step, on the very token ids and completion masks that
SFTTrainer receives (the backend does not re-tokenize). It reports rows, tokens, truncation
rate and the fraction of tokens that carry loss, and fails with exit code 2 when training
would be pointless:

* no rows at all, or a malformed row (raised earlier, with its row number);
* :data:`MIN_LOSS_TOKEN_FRACTION`: fewer than 1 % of all tokens carry loss. A real chat or
  instruction dataset has 10-60 %; under 1 % means the prompt mask swallowed the answers (the
  ``train_on_responses_only`` failure mode) or the answers are empty;
* :data:`MAX_NO_LOSS_ROW_FRACTION`: more than 10 % of rows keep no loss token at all after
  truncation (the prompt alone fills ``max_seq_length``, or the template hides the answer).
  Such rows are dropped (TRL would drop them too); a few are tolerated and logged.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from runner.errors import DataError
from runner.train.backend import TokenizedExample
from runner.train.formatting import FormattedRow

log = logging.getLogger(__name__)

MIN_LOSS_TOKEN_FRACTION = 0.01
"""Fail when fewer than this fraction of all training tokens carry loss."""
MAX_NO_LOSS_ROW_FRACTION = 0.10
"""Fail when more than this fraction of rows have no loss-carrying token after truncation."""
WARN_TRUNCATION_FRACTION = 0.05
"""Log a warning when more than this fraction of rows is cut at ``max_seq_length``."""

_BATCH = 512


@dataclass(frozen=True)
class PreflightReport:
    """What the trainer will see; logged, exported as metrics and written to the manifest.

    Attributes:
        rows: Rows kept for training.
        dropped_rows: Rows dropped because no token carries loss after truncation.
        tokens: Tokens in the kept rows (after truncation).
        loss_tokens: Tokens that carry loss.
        truncated_rows: Rows cut at ``max_seq_length``.
        max_row_tokens: Longest row before truncation.
        mean_row_tokens: Mean row length after truncation.
        max_seq_length: The cut-off used.
    """

    rows: int
    dropped_rows: int
    tokens: int
    loss_tokens: int
    truncated_rows: int
    max_row_tokens: int
    mean_row_tokens: float
    max_seq_length: int

    @property
    def loss_token_fraction(self) -> float:
        """Fraction of tokens that carry loss."""
        return self.loss_tokens / self.tokens if self.tokens else 0.0

    @property
    def truncation_rate(self) -> float:
        """Fraction of rows cut at ``max_seq_length``."""
        total = self.rows + self.dropped_rows
        return self.truncated_rows / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logs and the manifest."""
        return {
            **asdict(self),
            "loss_token_fraction": round(self.loss_token_fraction, 6),
            "truncation_rate": round(self.truncation_rate, 6),
        }


def tokenize_rows(
    rows: Sequence[FormattedRow], tokenizer: Any, max_seq_length: int
) -> tuple[list[TokenizedExample], list[int]]:
    """Token ids and completion masks for each row, cut to ``max_seq_length``.

    Returns:
        The examples (same order as ``rows``) and each row's length before truncation.
    """
    examples: list[TokenizedExample | None] = [None] * len(rows)
    full_lengths = [0] * len(rows)
    for special in (True, False):
        idx = [i for i, r in enumerate(rows) if r.add_special_tokens is special]
        for start in range(0, len(idx), _BATCH):
            batch = idx[start : start + _BATCH]
            enc = tokenizer(
                [rows[i].text for i in batch],
                add_special_tokens=special,
                return_offsets_mapping=True,
                truncation=False,
            )
            for k, i in enumerate(batch):
                ids = list(enc["input_ids"][k])
                mask = _loss_mask(enc["offset_mapping"][k], rows[i].loss_spans)
                full_lengths[i] = len(ids)
                examples[i] = TokenizedExample(
                    array("i", ids[:max_seq_length]),
                    array("b", mask[:max_seq_length]),
                    rows[i].where,
                )
    return [e for e in examples if e is not None], full_lengths


def _loss_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    # A token carries loss when its characters overlap a loss span; tokens the tokenizer added
    # itself (BOS) have an empty (0, 0) offset and never do.
    return [
        int(end > start and any(start < s_end and end > s_start for s_start, s_end in spans))
        for start, end in offsets
    ]


def preflight(
    rows: Sequence[FormattedRow], tokenizer: Any, max_seq_length: int, *, name: str = "train"
) -> tuple[list[TokenizedExample], PreflightReport]:
    """Tokenize, measure and check the data; return what to train on.

    Args:
        rows: Formatted rows.
        tokenizer: A fast tokenizer (offsets are needed to place the loss mask).
        max_seq_length: Truncation length.
        name: 'train' or 'eval', for messages.

    Raises:
        DataError: empty data, or (almost) no tokens carrying loss (exit code 2).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "spec.model.source: the tokenizer is not a 'fast' tokenizer (no tokenizer.json), "
            "so the loss mask cannot be placed; provide tokenizer.json with the model"
        )
    if not rows:
        raise DataError(f"dataset: the {name} split has no rows")
    examples, lengths = tokenize_rows(rows, tokenizer, max_seq_length)
    kept = [e for e in examples if any(e.completion_mask)]
    dropped = [e for e in examples if not any(e.completion_mask)]
    tokens = sum(len(e.input_ids) for e in kept)
    report = PreflightReport(
        rows=len(kept),
        dropped_rows=len(dropped),
        tokens=tokens,
        loss_tokens=sum(sum(e.completion_mask) for e in kept),
        truncated_rows=sum(1 for n in lengths if n > max_seq_length),
        max_row_tokens=max(lengths, default=0),
        mean_row_tokens=round(tokens / len(kept), 2) if kept else 0.0,
        max_seq_length=max_seq_length,
    )
    _check(report, dropped, name)
    return kept, report


def _check(report: PreflightReport, dropped: Sequence[TokenizedExample], name: str) -> None:
    total = report.rows + report.dropped_rows
    if dropped and (not report.rows or report.dropped_rows / total > MAX_NO_LOSS_ROW_FRACTION):
        raise DataError(
            f"dataset: {report.dropped_rows} of {total} {name} rows have no token that carries "
            f"loss after truncation to {report.max_seq_length} tokens (first: {dropped[0].row}); "
            "raise training.max_seq_length, check dataset.chat_template, or set "
            "dataset.train_on: all",
            details=[f"{e.row}: no token carries loss" for e in dropped[:5]],
        )
    if report.loss_token_fraction < MIN_LOSS_TOKEN_FRACTION:
        raise DataError(
            f"dataset: only {report.loss_tokens} of {report.tokens} {name} tokens "
            f"({100 * report.loss_token_fraction:.2f}%) carry loss, below the "
            f"{100 * MIN_LOSS_TOKEN_FRACTION:.0f}% minimum; completion masking hides almost "
            "everything (check dataset.format, dataset.fields and dataset.chat_template)"
        )
    if dropped:
        log.warning(
            "dropped %d %s rows with no loss token after truncation (first: %s)",
            len(dropped),
            name,
            dropped[0].row,
        )
    if report.truncation_rate > WARN_TRUNCATION_FRACTION:
        log.warning(
            "%.1f%% of %s rows are longer than max_seq_length %d and were cut",
            100 * report.truncation_rate,
            name,
            report.max_seq_length,
        )
