"""The preflight: statistics of exactly what trains, and refusal of loss-less data."""

from __future__ import annotations

from typing import Any

import pytest

from runner.errors import DataError
from runner.train.formatting import FormattedRow
from runner.train.preflight import (
    MAX_NO_LOSS_ROW_FRACTION,
    MIN_LOSS_TOKEN_FRACTION,
    preflight,
)


def _row(n: int, prompt: str, answer: str) -> FormattedRow:
    text = prompt + answer
    return FormattedRow(
        f"dataset.sources[0]: row {n}", text, ((len(prompt), len(text)),), add_special_tokens=True
    )


def test_report_counts_tokens_loss_and_truncation(tiny_tokenizer: Any) -> None:
    rows = [_row(1, "abcd", "ef"), _row(2, "q", "y" * 30)]
    examples, report = preflight(rows, tiny_tokenizer, max_seq_length=16)
    # byte-level tokenizer: one token per character, plus BOS (which never carries loss)
    assert [len(e.input_ids) for e in examples] == [7, 16]
    assert [sum(e.completion_mask) for e in examples] == [2, 14]
    assert tuple(examples[0].completion_mask) == (0, 0, 0, 0, 0, 1, 1)
    assert (report.rows, report.dropped_rows, report.tokens, report.loss_tokens) == (2, 0, 23, 16)
    assert report.truncated_rows == 1 and report.truncation_rate == 0.5
    assert report.max_row_tokens == 32


def test_rows_without_loss_after_truncation_fail_with_their_row(tiny_tokenizer: Any) -> None:
    rows = [_row(n, "p" * 40, "a") for n in range(1, 4)] + [_row(4, "p", "answer")]
    with pytest.raises(DataError) as e:
        preflight(rows, tiny_tokenizer, max_seq_length=20)
    assert "3 of 4 train rows have no token that carries loss" in e.value.message
    assert "first: dataset.sources[0]: row 1" in e.value.message
    assert "raise training.max_seq_length" in e.value.message
    assert e.value.exit_code == 2


def test_a_few_loss_less_rows_are_dropped_not_fatal(tiny_tokenizer: Any) -> None:
    ok = [_row(n, "p", "answer") for n in range(1, 20)]
    examples, report = preflight([*ok, _row(20, "p" * 40, "a")], tiny_tokenizer, 20)
    assert MAX_NO_LOSS_ROW_FRACTION >= 1 / 20
    assert report.rows == 19 and report.dropped_rows == 1
    assert all(any(e.completion_mask) for e in examples)


def test_almost_no_loss_tokens_fails(tiny_tokenizer: Any) -> None:
    # 1 answer character per 200 prompt characters: 0.5% of tokens carry loss
    rows = [_row(n, "p" * 199, "a") for n in range(1, 5)]
    with pytest.raises(DataError, match=r"only 4 of 804 train tokens \(0.50%\) carry loss"):
        preflight(rows, tiny_tokenizer, max_seq_length=512)
    assert MIN_LOSS_TOKEN_FRACTION == 0.01


def test_masks_hidden_by_a_wrong_template_fail(tiny_tokenizer: Any) -> None:
    # the train_on_responses_only failure mode: the answer span points nowhere
    rows = [
        FormattedRow(f"dataset.sources[0]: row {n}", "question and answer", ((500, 510),), True)
        for n in range(1, 4)
    ]
    with pytest.raises(DataError, match="3 of 3 train rows have no token that carries loss"):
        preflight(rows, tiny_tokenizer, max_seq_length=64)


def test_empty_split_fails(tiny_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="the eval split has no rows"):
        preflight([], tiny_tokenizer, 64, name="eval")


def test_report_is_serialisable(tiny_tokenizer: Any) -> None:
    _, report = preflight([_row(1, "ab", "cd")], tiny_tokenizer, 64)
    d = report.as_dict()
    assert d["loss_token_fraction"] == pytest.approx(2 / 5)
    assert d["truncation_rate"] == 0.0
