"""What PyTorch's CUDA caching allocator did during training: a summary, and an opt-in history.

The planner estimates the allocator's *reserved* peak (``max_memory_reserved``). When reserved
runs far ahead of allocated, the cause is in the allocator: segments of the default mode that
cannot be merged, blocks split and left inactive, or expandable segments not in effect. This
module reads what answers that, without a device synchronisation:

- :func:`allocator_report`: the allocator's backend, whether its segments are expandable, how
  many there are, the largest, and the counters of ``torch.cuda.memory_stats()`` that explain
  a reserved peak (device allocations and frees, allocation retries, inactive split bytes).
  Logged with the "training done" record.
- ``QLORA_CUDA_MEMORY_HISTORY=FILE`` (:func:`start_history` / :func:`dump_history`): PyTorch's
  own allocation history (``torch.cuda.memory._record_memory_history``) from the model load to
  the end of training, written to ``FILE`` as a snapshot pickle for
  https://pytorch.org/memory_viz (or ``bench/memory_snapshot_summary.py``). Off by default: it
  records a Python stack per allocation and slows every step a little.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HISTORY_ENV = "QLORA_CUDA_MEMORY_HISTORY"
"""Path of the snapshot pickle to write; unset or empty records nothing."""
HISTORY_ENTRIES = 200_000
"""Allocation events kept (the newest); one 8B step makes a few thousand."""

_STATS = (
    "num_device_alloc",
    "num_device_free",
    "num_alloc_retries",
    "num_sync_all_streams",
    "num_ooms",
    "inactive_split_bytes.all.peak",
    "requested_bytes.all.peak",
    "allocated_bytes.all.peak",
    "reserved_bytes.all.peak",
)


def summarize_allocator(
    stats: dict[str, Any], segments: list[dict[str, Any]], backend: str
) -> dict[str, Any]:
    """The report's fields from ``memory_stats()``, ``memory_snapshot()`` and the backend name."""
    sizes = [int(s.get("total_size", 0)) for s in segments]
    expandable = {bool(s.get("is_expandable", False)) for s in segments}
    return {
        "backend": backend,
        # "mixed": the mode changed mid-run (``_set_allocator_settings`` after some segments)
        "expandable_segments": (
            "none"
            if not segments
            else "mixed"
            if len(expandable) > 1
            else str(expandable.pop()).lower()
        ),
        "segments": len(segments),
        "largest_segment_bytes": max(sizes, default=0),
        "segment_bytes": sum(sizes),
        **{k.replace(".all.", "_").replace(".", "_"): int(stats.get(k, 0)) for k in _STATS},
    }


def allocator_report() -> dict[str, Any]:
    """:func:`summarize_allocator` for CUDA device 0's allocator; {} without CUDA in use."""
    try:
        import torch
    except ImportError:
        return {}
    cuda = torch.cuda
    if not (cuda.is_available() and cuda.is_initialized()):
        return {}
    try:
        return summarize_allocator(
            dict(cuda.memory_stats()),
            list(cuda.memory_snapshot()),
            str(cuda.get_allocator_backend()),
        )
    except Exception as e:  # a reading only: never fail a run over it
        log.debug("no allocator report: %s", e)
        return {}


def history_path(environ: dict[str, str] | None = None) -> Path | None:
    """Where ``QLORA_CUDA_MEMORY_HISTORY`` asks the snapshot to go; None when unset."""
    value = (os.environ if environ is None else environ).get(HISTORY_ENV, "").strip()
    return Path(value) if value else None


def start_history() -> bool:
    """Begin recording allocations when ``QLORA_CUDA_MEMORY_HISTORY`` is set (and CUDA exists)."""
    path = history_path()
    if path is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        log.warning(
            "%s is set but this process has no CUDA device: nothing is recorded", HISTORY_ENV
        )
        return False
    try:
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=HISTORY_ENTRIES)
    except (AttributeError, RuntimeError) as e:  # diagnostics only: the run goes on without
        log.warning("%s: PyTorch would not record allocations: %s", HISTORY_ENV, e)
        return False
    log.info("recording CUDA allocations for %s", path, extra={"memory_history": str(path)})
    return True


def dump_history(reason: str) -> Path | None:
    """Write the recorded history to ``QLORA_CUDA_MEMORY_HISTORY`` and stop recording."""
    path = history_path()
    if path is None:
        return None
    try:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
    except Exception as e:  # diagnostics only: the run goes on without them
        log.warning("could not write the CUDA memory history to %s: %s", path, e)
        return None
    log.info(
        "CUDA memory history (%s) written to %s", reason, path, extra={"memory_history": str(path)}
    )
    return path
