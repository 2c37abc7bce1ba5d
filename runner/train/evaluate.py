"""Is the adapter any *good*? Base and adapter scored on the same held-out rows.

Verification (:mod:`runner.train.verify`) proves the adapter changed and is the one saved;
this module measures whether it helps. It runs on the session verification already loaded
(a fresh base model with the saved adapter on top): the adapter's numbers come from the model
as it is, the base's from the same model inside ``disable_adapter()``, so evaluation loads
nothing more and needs no extra weight memory. Rows are scored in small batches with
``torch.no_grad`` (a batch's logits stay well inside the training step's loss term).

What is measured, on the completion tokens of each held-out row (the answer, as in
completion-only training, whatever ``dataset.train_on`` says):

* **loss** (mean negative log-likelihood per token, nats) and **perplexity** = exp(loss);
* **accuracy**, where the rows carry answers to score:

  - ``choices``: a row lists its options in a field (default ``choices``); each option is put
    in place of the answer and scored by the log-likelihood of its answer tokens (one forward
    pass per option, no generation); the row is right when the true answer scores highest;
  - ``exact-match``: the answer counts as reproduced when, at every answer token, the model's
    most likely next token is that token (teacher forcing) - exactly when greedy decoding
    would generate the answer, at the cost of one forward pass.

The statistics and the gate are in :mod:`runner.train.eval_stats`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import DataError, missing_extra
from runner.spec.model import DatasetFormat, DatasetSpec
from runner.train.backend import ModelSession, TokenizedExample
from runner.train.dataset import Row
from runner.train.eval_stats import EvalReport, GateRule, compare
from runner.train.formatting import format_rows
from runner.train.preflight import tokenize_rows
from runner.train.template_sandbox import ChatTemplate

log = logging.getLogger(__name__)

SCORINGS = ("auto", "choices", "exact-match", "loss")
EVAL_LOGIT_BYTES = 8
"""Bytes per (token x vocab) element while scoring: fp32 logits and their log-softmax."""


@dataclass(frozen=True)
class EvalItem:
    """One held-out row, ready to score.

    Attributes:
        example: The row with its true answer (loss, exact match).
        candidates: The row with each listed option as the answer (``choices`` scoring).
        gold: Index of the true answer in ``candidates`` (-1 without candidates).
    """

    example: TokenizedExample
    candidates: tuple[TokenizedExample, ...] = ()
    gold: int = -1


def _answer_key(spec: DatasetSpec) -> str | None:
    f = spec.fields
    if spec.format is DatasetFormat.PROMPT_COMPLETION:
        return f.completion
    if spec.format is DatasetFormat.ALPACA:
        return f.output
    return None


def _answer(row: Row, spec: DatasetSpec) -> str:
    key = _answer_key(spec)
    if key is not None:
        return str(row.data.get(key, ""))
    messages = row.data.get(spec.fields.messages) or []
    turns = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
    if not turns:
        raise DataError(f"{row.where}: no assistant message holds the answer to score")
    return str(turns[-1].get("content", ""))


def _with_answer(row: Row, spec: DatasetSpec, answer: str) -> Row:
    data = dict(row.data)
    key = _answer_key(spec)
    if key is not None:
        data[key] = answer
    else:
        messages = [dict(m) for m in data[spec.fields.messages]]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        messages[last]["content"] = answer
        data[spec.fields.messages] = messages
    return Row(row.where, data)


def _options(row: Row, field: str) -> list[str] | None:
    value = row.data.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise DataError(f"{row.where}: field '{field}' must be a list of at least two strings")
    return list(value)


def resolve_scoring(rows: Sequence[Row], spec: DatasetSpec, scoring: str, field: str) -> str:
    """The scoring actually used: 'auto' is 'choices' when every row lists options."""
    if spec.format is DatasetFormat.TEXT:
        return "loss"
    if scoring == "auto":
        return "choices" if rows and all(field in r.data for r in rows) else "loss"
    return scoring


def build_items(
    rows: Sequence[Row],
    spec: DatasetSpec,
    tokenizer: Any,
    chat_template: ChatTemplate | None,
    max_seq_length: int,
    *,
    scoring: str,
    choices_field: str = "choices",
) -> list[EvalItem]:
    """Format and tokenize held-out rows (and their options) for scoring.

    Raises:
        DataError: an option list is malformed or does not contain the row's answer.
    """
    # Completion tokens are what is scored, whatever the training loss covered.
    fmt = (
        spec
        if spec.format is DatasetFormat.TEXT
        else spec.model_copy(update={"train_on": "completions"})
    )
    gold_rows = format_rows(rows, fmt, tokenizer, chat_template)
    golds, _ = tokenize_rows(gold_rows, tokenizer, max_seq_length)
    if scoring != "choices":
        return [EvalItem(g) for g in golds]
    items = []
    for row, gold in zip(rows, golds, strict=True):
        options = _options(row, choices_field)
        if options is None:
            raise DataError(f"{row.where}: no '{choices_field}' list to score (evaluation.scoring)")
        truth = _answer(row, spec).strip()
        matches = [i for i, o in enumerate(options) if o.strip() == truth]
        if not matches:
            raise DataError(
                f"{row.where}: the answer {truth[:40]!r} is not one of its {choices_field} "
                f"{[o[:20] for o in options]}"
            )
        variants = [_with_answer(row, spec, o) for o in options]
        cands, _ = tokenize_rows(
            format_rows(variants, fmt, tokenizer, chat_template), tokenizer, max_seq_length
        )
        items.append(EvalItem(gold, tuple(cands), matches[0]))
    return items


@dataclass(frozen=True)
class RowScore:
    """One sequence scored: summed NLL of its completion tokens, their count, greedy match."""

    nll: float
    tokens: int
    greedy_match: bool


def score_examples(
    model: Any, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int
) -> list[RowScore]:
    """Score each example's completion tokens with ``model`` as it is (no gradient)."""
    try:
        import torch
    except ImportError as e:
        raise missing_extra("torch", "train") from e
    device = next(model.parameters()).device
    # Longest batch first: each later batch's logits are no larger, so the caching allocator
    # reuses the first batch's blocks. Shortest first made every batch a new, larger
    # allocation, and reserved memory grew by the sum (bench/speed/run7-data: the card peaked
    # at 57-63 GiB for runs whose training step reserved 13-19 GiB).
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    out: list[RowScore | None] = [None] * len(examples)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [list(examples[i].input_ids) for i in idx]
            masks = [list(examples[i].completion_mask) for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
            attn = torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device
            )
            loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            target = ids[:, 1:]
            token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            hit = logp.argmax(-1) == target
            del logp
            m = loss_mask[:, 1:].bool()
            for k, i in enumerate(idx):
                n = int(m[k].sum())
                out[i] = RowScore(
                    nll=float(-(token_lp[k][m[k]]).double().sum()),
                    tokens=n,
                    greedy_match=bool(hit[k][m[k]].all()) if n else False,
                )
    return [s for s in out if s is not None]


def _score_model(
    model: Any, items: Sequence[EvalItem], scoring: str, pad_id: int, batch_size: int
) -> tuple[list[float], list[int], list[bool] | None]:
    flat = [it.example for it in items]
    if scoring == "choices":
        flat += [c for it in items for c in it.candidates]
    # An option identical to the true answer's sequence is scored once.
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    distinct: list[TokenizedExample] = []
    slots = []
    for e in flat:
        key = (tuple(e.input_ids), tuple(e.completion_mask))
        if key not in index:
            index[key] = len(distinct)
            distinct.append(e)
        slots.append(index[key])
    scored = score_examples(model, distinct, pad_id, batch_size)
    scores = [scored[k] for k in slots]
    golds, rest = scores[: len(items)], scores[len(items) :]
    correct: list[bool] | None = None
    if scoring == "exact-match":
        correct = [s.greedy_match for s in golds]
    elif scoring == "choices":
        correct, pos = [], 0
        for it in items:
            options = rest[pos : pos + len(it.candidates)]
            pos += len(it.candidates)
            # The most likely option: lowest summed NLL of its answer tokens (first on ties).
            best = min(range(len(options)), key=lambda j: options[j].nll)
            correct.append(best == it.gold)
    return [s.nll for s in golds], [s.tokens for s in golds], correct


def eval_batch_size(micro_batch: int, max_seq_length: int, vocab: int, budget: int) -> int:
    """Rows per scoring batch whose fp32 logits stay within ``budget`` bytes (at least 1)."""
    per_row = max(1, max_seq_length * vocab * EVAL_LOGIT_BYTES)
    return max(1, min(micro_batch, budget // per_row))


def evaluate(
    session: ModelSession,
    items: Sequence[EvalItem],
    *,
    scoring: str,
    rule: GateRule,
    split: str,
    batch_size: int = 4,
) -> EvalReport:
    """Score base and adapter on ``items`` with the one loaded model, and apply the gate.

    Args:
        session: A model with the adapter attached (``disable_adapter()`` gives the base).
        items: From :func:`build_items`.
        scoring: 'choices', 'exact-match' or 'loss' (already resolved).
        rule: The quality gate.
        split: Where the rows came from, for the report (``eval split``, ``held-out slice``).
        batch_size: Sequences per forward pass.
    """
    if not items:
        raise DataError("evaluation: there are no held-out rows to evaluate on")
    model = session.model
    pad = session.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else 0)
    model.eval()
    adapter_nll, tokens, adapter_ok = _score_model(model, items, scoring, pad_id, batch_size)
    with model.disable_adapter():
        base_nll, _, base_ok = _score_model(model, items, scoring, pad_id, batch_size)
    report = compare(
        split=split,
        scoring=scoring,
        base_nll=base_nll,
        adapter_nll=adapter_nll,
        tokens=tokens,
        base_correct=base_ok,
        adapter_correct=adapter_ok,
        rule=rule,
    )
    log.info(
        "evaluation: %s; gate %s",
        report.summary(),
        "passed" if report.gate_passed else "FAILED",
        extra={"evaluation": report.as_dict()},
    )
    return report


@dataclass(frozen=True)
class HeldOut:
    """The rows evaluation scores, and where they came from (for the manifest)."""

    rows: tuple[Row, ...]
    split: str
    record: dict[str, Any]


def held_out(
    train: Sequence[Row], eval_rows: Sequence[Row], fraction: float, seed: int, max_rows: int | None
) -> tuple[tuple[Row, ...], HeldOut]:
    """The rows to evaluate on, carved from training *before* training when there is no split.

    Returns:
        The training rows (without the carved slice) and the held-out rows with their record.
    """
    from runner.train.dataset import split_rows

    if eval_rows:
        rows, split, kept = tuple(eval_rows), "eval split", tuple(train)
        record: dict[str, Any] = {"source": "evaluation.sources or dataset.eval_fraction"}
    else:
        new_train, carved = split_rows(train, fraction, seed)
        if not carved:
            raise DataError(
                "evaluation: too few rows to hold any out; add rows, set dataset.eval_fraction "
                "or evaluation.enabled: false"
            )
        rows, split, kept = tuple(carved), "held-out slice", tuple(new_train)
        record = {"source": "evaluation.holdout_fraction", "fraction": fraction, "seed": seed}
    if max_rows is not None:
        rows = rows[:max_rows]
    import hashlib

    record.update(
        rows=len(rows),
        rows_sha256=hashlib.sha256("\n".join(r.where for r in rows).encode()).hexdigest(),
        first_rows=[r.where for r in rows[:5]],
    )
    return kept, HeldOut(rows, split, record)
