"""CUDA out-of-memory as a failure class of its own (exit code 6), not an internal error.

An OOM means the plan was wrong for this GPU, not that the code is broken or the data bad:
the submitter and the operator read exit code 6 from the pod and re-plan (half the micro
batch, double the accumulation, else the next GPU class; see :mod:`runner.plan.replan`).
The message names the step and the batch shape so the re-plan (and a human) can see what
did not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runner.errors import OutOfMemoryError

log = logging.getLogger(__name__)


def is_cuda_oom(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch's out-of-memory error (CUDA, or any accelerator)."""
    try:
        import torch
    except ImportError:
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(error, oom)


@contextmanager
def cuda_oom_as_error(what: str, shape: Any = None) -> Iterator[None]:
    """Translate a PyTorch out-of-memory error raised inside into :class:`OutOfMemoryError`.

    Args:
        what: What was running ("training", "verification"), for the message.
        shape: The :class:`runner.train.backend.BatchShape`, named in the message.
    """
    try:
        yield
    except Exception as e:
        if not is_cuda_oom(e):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = (
            f" with micro batch {shape.micro_batch_size} x accumulation "
            f"{shape.gradient_accumulation_steps}, max_seq_length {shape.max_seq_length}"
            if shape is not None
            else ""
        )
        _free_cuda_cache()
        raise OutOfMemoryError(
            f"CUDA out of memory during {what}{where}: {first_line[:300]}; the operator "
            "re-plans with half the micro batch (or a larger GPU class)"
        ) from e


def _free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except (ImportError, RuntimeError) as e:  # best effort: the process is about to exit
        log.debug("could not empty the CUDA cache: %s", e)
