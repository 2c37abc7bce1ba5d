"""The ranks of a data-parallel run: who am I, the process group, and what ranks agree on.

``torchrun`` starts one process per GPU and tells each its place through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). This module reads
that, opens the process group early (NCCL on GPUs, gloo on the CPU) with the collective
timeout from settings, so that the recipe can share rank 0's tokenized data and errors with
the others, and so that a SIGTERM seen by any rank stops every rank at the same step. The
trainer (accelerate) finds the group already open and uses it.

One process without torchrun is world size 1: every helper here is then a no-op, and torch
is not even imported.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

from runner.errors import ExitCode, RunnerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """This process's place in the run.

    Attributes:
        rank: Global rank (0 verifies, saves, publishes and reports).
        local_rank: Rank on this node; the CUDA device index.
        world_size: Ranks in all.
        node_rank: Which node (pod) this is.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one rank... or torchrun started this process."""
        return self.world_size > 1 or under_torchrun()


def under_torchrun() -> bool:
    """Whether ``torchrun`` started this process (it sets ``TORCHELASTIC_RUN_ID``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def current() -> Rank:
    """This process's rank from torchrun's environment (rank 0 of 1 without torchrun)."""
    if not under_torchrun():
        return Rank()
    env = os.environ
    return Rank(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        node_rank=int(env.get("GROUP_RANK", "0")),
    )


class RankFailedError(RunnerError):
    """Another rank (rank 0) failed with a runner error; this rank stops with its exit code."""

    def __init__(self, exit_code: int, lines: list[str]) -> None:
        super().__init__(lines[0] if lines else "rank 0 failed", lines[1:])
        self.exit_code = ExitCode(exit_code)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def init(rank: Rank, timeout_s: int) -> None:
    """Open the process group (NCCL with CUDA, else gloo) and pin this rank's GPU."""
    if not rank.distributed:
        return
    import torch

    dist = _dist()
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank.local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": torch.device("cuda", rank.local_rank)} if cuda else {}),
    )
    log.info(
        "rank %d of %d (local rank %d, %s, collective timeout %d s)",
        rank.rank,
        rank.world_size,
        rank.local_rank,
        backend,
        timeout_s,
        extra={"rank": rank.rank, "world_size": dist.get_world_size()},
    )


def world_size() -> int:
    """Ranks in the open process group (1 without one)."""
    if "torch" not in __import__("sys").modules:
        return 1
    dist = _dist()
    return int(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1


def _active() -> bool:
    return world_size() > 1 or (
        under_torchrun() and "torch" in __import__("sys").modules and _dist().is_initialized()
    )


def broadcast(value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (pickled; the collective timeout bounds the wait)."""
    if not _active():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def share_from_main(rank: Rank, make: Any) -> Any:
    """Run ``make()`` on rank 0 only and hand its result to every rank.

    A :class:`RunnerError` on rank 0 is re-raised there and, with the same exit code and
    message, on every other rank, so a bad dataset fails the whole group at once instead of
    leaving the others waiting for the collective timeout.
    """
    if not _active():
        return make()
    if rank.is_main:
        try:
            result = make()
        except RunnerError as e:
            broadcast(("error", int(e.exit_code), e.lines()))
            raise
        broadcast(("ok", result))
        return result
    outcome = broadcast()
    if outcome[0] == "error":
        raise RankFailedError(outcome[1], list(outcome[2]))
    return outcome[1]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (an all-reduce MAX; local value alone
    on one process)."""
    if not _active():
        return flag
    import torch

    dist = _dist()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (bounded by the collective timeout)."""
    if _active():
        _dist().barrier()


def close() -> None:
    """Leave the process group (at the end of a run)."""
    if "torch" in __import__("sys").modules:
        dist = _dist()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
