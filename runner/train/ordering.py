"""The training rows in the order the plan was sized for (see :mod:`runner.plan.lengths`).

The trainer reads the dataset sequentially (``train_sampling_strategy='sequential'``); the
order is made here: one seeded shuffle per epoch, steps of ``micro x accumulation`` rows cut
from the shuffled rows (across epoch boundaries, so every micro batch holds exactly ``micro``
rows and only the very last step may be short), and the rows of each step dealt to its micro
batches with balanced token counts (padding-free) or grouped by length (padded). The trainer
then runs ``epochs / ceil(epochs)`` passes over the laid-out rows, which is ``epochs`` passes
over the data. Resuming skips the same batches in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from runner.plan.lengths import batch_order, micro_batch_tokens
from runner.train.backend import TokenizedExample


@dataclass(frozen=True)
class Ordered:
    """The laid-out rows.

    Attributes:
        examples: The rows in training order (``ceil(epochs)`` passes).
        epochs: What the trainer's ``num_train_epochs`` becomes.
        peak_tokens: Tokens of the largest micro batch (padded: rows x longest row).
        micro_batches: How many micro batches the order holds.
    """

    examples: list[TokenizedExample]
    epochs: float
    peak_tokens: int
    micro_batches: int


def order_rows(
    train: Sequence[TokenizedExample],
    micro_batch: int,
    accumulation: int,
    *,
    seed: int,
    epochs: float,
    padding_free: bool,
) -> Ordered:
    """Lay ``train`` out for a sequential loader (see the module docstring)."""
    lengths = [len(e.input_ids) for e in train]
    passes = max(1, math.ceil(epochs))
    batches = batch_order(
        lengths, micro_batch, accumulation, seed=seed, epochs=passes, padding_free=padding_free
    )
    sizes = micro_batch_tokens(lengths, batches, padding_free=padding_free)
    examples = [train[i] for b in batches for i in b]
    return Ordered(examples, epochs / passes, max(sizes, default=0), len(batches))
