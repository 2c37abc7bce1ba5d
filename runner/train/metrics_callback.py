"""Feeds :class:`runner.metrics.RunMetrics` from inside ``trainer.train()``, for free.

A metrics hook runs once per optimizer step of a training loop that is otherwise bound by the
GPU. Anything that waits for the GPU there (``tensor.item()``, ``.cpu()``, printing a device
tensor, ``torch.cuda.synchronize()``) would stall the CUDA stream every step and cost real
throughput. So :class:`MetricsCallback` never touches a tensor. It reads only:

* plain Python numbers the trainer has already brought to the host: ``state.global_step``,
  ``state.epoch``, ``state.max_steps``, ``state.num_input_tokens_seen`` (which the trainer
  synchronises for itself when ``include_num_input_tokens_seen`` is on), and the ``logs`` dict
  of ``on_log`` (loss, learning rate and grad norm, already floats);
* token counts of the training rows computed once before training from the tokenized
  examples (:class:`TokenCounts`; plain integers);
* the CUDA caching allocator's counters (``torch.cuda.memory_allocated`` and friends), which
  are host-side bookkeeping and never synchronise the device.

Tokens carrying loss and samples are derived from those: ``samples = epoch x rows`` (exact at
every epoch boundary, to within one micro batch between them) and ``loss tokens = tokens x
(loss tokens / tokens of the dataset)`` (exact over each epoch, the expected value within one).
Without ``num_input_tokens_seen`` (a backend that leaves ``include_num_input_tokens_seen``
off, which also spares the trainer its own per-batch sync for that count) tokens come from
``epoch x tokens`` of the dataset the same way.

``tests/test_metrics_callback.py`` proves the "no tensor" rule twice: it trains the tiny model
with ``Tensor.item``, ``.cpu``, ``.tolist``, the number conversions and
``torch.cuda.synchronize`` wrapped, asserting none is ever called from the metrics code; and on
a GPU it runs the callback between in-flight steps under CUDA's sync debug mode ``"error"``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import missing_extra
from runner.metrics import DeviceMemory, RunMetrics
from runner.train.backend import TokenizedExample

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - the train extra is what this module is for
    raise missing_extra("transformers", "train") from e

log = logging.getLogger(__name__)

RATE_WINDOW_STEPS = 20
"""Throughput and ETA are averaged over this many recent optimizer steps."""
VRAM_INTERVAL_S = 1.0
"""Allocator statistics are read at most this often (they are cheap; this keeps them so)."""


@dataclass(frozen=True)
class TokenCounts:
    """What one pass over the training data contains.

    Attributes:
        rows: Training sequences.
        tokens: Their tokens (no padding).
        loss_tokens: Tokens that carry loss (the first token of a row never does: the loss
            predicts each token from the ones before it).
    """

    rows: int
    tokens: int
    loss_tokens: int

    @classmethod
    def from_examples(
        cls, examples: Sequence[TokenizedExample], *, completion_only: bool = True
    ) -> TokenCounts:
        """Count ``examples`` once, before training (pure Python, no tensors).

        Args:
            examples: The tokenized training rows.
            completion_only: Only ``completion_mask == 1`` tokens carry loss; else all do.
        """
        tokens = sum(len(e.input_ids) for e in examples)
        if completion_only:
            loss = sum(sum(e.completion_mask[1:]) for e in examples)
        else:
            loss = sum(max(0, len(e.input_ids) - 1) for e in examples)
        return cls(rows=len(examples), tokens=tokens, loss_tokens=loss)

    @property
    def loss_fraction(self) -> float:
        """Share of tokens that carry loss."""
        return self.loss_tokens / self.tokens if self.tokens else 0.0


def read_cuda_memory() -> list[DeviceMemory]:
    """Allocator statistics of every CUDA device this process has used; [] without CUDA.

    Reads the caching allocator's host-side counters only: no device synchronisation. A
    process that never initialised CUDA (the CPU backend) reports nothing, and CUDA is not
    initialised here just to ask.
    """
    try:
        import torch
    except ImportError:
        return []
    cuda = torch.cuda
    if not (cuda.is_available() and cuda.is_initialized()):
        return []
    out = []
    for i in range(cuda.device_count()):
        out.append(
            DeviceMemory(
                device=f"cuda:{i}",
                allocated=int(cuda.memory_allocated(i)),
                reserved=int(cuda.memory_reserved(i)),
                peak_allocated=int(cuda.max_memory_allocated(i)),
                peak_reserved=int(cuda.max_memory_reserved(i)),
                total=int(cuda.get_device_properties(i).total_memory),
            )
        )
    return out


def record_memory(
    metrics: RunMetrics, read: Callable[[], list[DeviceMemory]] = read_cuda_memory
) -> None:
    """Copy every device's allocator statistics into ``metrics`` (e.g. at a phase change)."""
    for mem in read():
        metrics.set_memory(mem)


@dataclass
class _Mark:
    when: float
    step: int
    tokens: float
    samples: float


class MetricsCallback(TrainerCallback):  # type: ignore[misc]
    """A ``transformers.TrainerCallback`` that keeps :class:`RunMetrics` current.

    Pass it in the ``callbacks`` of :meth:`runner.train.backend.TrainerBackend.train`. It
    never touches a tensor (see the module docstring), so it adds no device synchronisation.

    Args:
        metrics: Where to record.
        counts: Token counts of the training rows; without them, tokens come only from
            ``state.num_input_tokens_seen`` and loss tokens and samples stay at zero.
        clock: Monotonic clock (seconds) for rates and the ETA.
        read_memory: Source of allocator statistics (CUDA's by default).
    """

    def __init__(
        self,
        metrics: RunMetrics,
        counts: TokenCounts | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        read_memory: Callable[[], list[DeviceMemory]] = read_cuda_memory,
    ) -> None:
        self.metrics = metrics
        self.counts = counts
        self._clock = clock
        self._read_memory = read_memory
        self._marks: deque[_Mark] = deque(maxlen=RATE_WINDOW_STEPS + 1)
        self._tokens = 0.0
        self._samples = 0.0
        self._memory_read_at = float("-inf")

    # Work done so far, from plain numbers only.
    def _work(self, state: Any) -> tuple[float, float]:
        epoch = float(state.epoch or 0.0)
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if self.counts is None:
            return float(seen), 0.0
        tokens = float(seen) if seen > 0 else epoch * self.counts.tokens
        return tokens, epoch * self.counts.rows

    def _record_memory(self, force: bool = False) -> None:
        now = self._clock()
        if force or now - self._memory_read_at >= VRAM_INTERVAL_S:
            self._memory_read_at = now
            record_memory(self.metrics, self._read_memory)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clocks; the step and epoch may be non-zero when resuming."""
        self._tokens, self._samples = self._work(state)
        self._marks.clear()
        self._marks.append(
            _Mark(self._clock(), int(state.global_step), self._tokens, self._samples)
        )
        self.metrics.set_progress(
            step=int(state.global_step),
            max_steps=int(state.max_steps),
            epoch=float(state.epoch or 0),
        )
        self._record_memory(force=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After each optimizer step: counters, throughput, progress, ETA, memory."""
        tokens, samples = self._work(state)
        fraction = self.counts.loss_fraction if self.counts else 0.0
        d_tokens, d_samples = tokens - self._tokens, samples - self._samples
        self.metrics.add_work(tokens=d_tokens, loss_tokens=d_tokens * fraction, samples=d_samples)
        self._tokens, self._samples = tokens, samples

        step, max_steps = int(state.global_step), int(state.max_steps)
        mark = _Mark(self._clock(), step, tokens, samples)
        self._marks.append(mark)
        first = self._marks[0]
        elapsed, steps = mark.when - first.when, mark.step - first.step
        eta: float | None = None
        if elapsed > 0 and steps > 0:
            tokens_per_s = (mark.tokens - first.tokens) / elapsed
            self.metrics.set_rates(
                tokens_per_s=tokens_per_s,
                loss_tokens_per_s=tokens_per_s * fraction,
                samples_per_s=(mark.samples - first.samples) / elapsed,
            )
            eta = max(0, max_steps - step) * elapsed / steps
        self.metrics.set_progress(
            step=step, max_steps=max_steps, epoch=float(state.epoch or 0.0), eta_s=eta
        )
        self._record_memory()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Loss, learning rate and grad norm, as the trainer logged them (host floats)."""
        logs = logs or {}
        self.metrics.observe_log(
            loss=_number(logs.get("loss")),
            learning_rate=_number(logs.get("learning_rate")),
            grad_norm=_number(logs.get("grad_norm")),
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Final progress and memory; the ETA drops to zero."""
        self.metrics.set_progress(
            step=int(state.global_step),
            max_steps=int(state.max_steps),
            epoch=float(state.epoch or 0.0),
            eta_s=0.0,
        )
        self._record_memory(force=True)


def _number(value: Any) -> float | None:
    """A logged value as a float, or None when absent or not a plain number.

    Only Python numbers are accepted: a tensor that slipped into the logs is skipped rather
    than converted, because converting it would synchronise the device.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
