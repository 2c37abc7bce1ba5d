"""A rate-limited work queue of object keys, after client-go's ``workqueue``.

The operator's watches say *which* FineTuneJob to look at; this queue decides *when*, with the
guarantees controllers rely on:

- **Deduplicated**: a key is in the queue at most once, however many events arrive for it.
- **One worker per key**: a key being reconciled is not handed out again; added meanwhile, it
  is queued once more when :meth:`WorkQueue.done` is called, so no change is lost and no two
  workers ever reconcile the same object at once.
- **Per-key exponential backoff** (:class:`ExponentialBackoff`, client-go's
  ``ItemExponentialFailureRateLimiter``): a FineTuneJob whose reconcile keeps failing waits
  base, 2 x base, 4 x base ... up to a cap between tries, while every other key goes on.
  :meth:`WorkQueue.forget` resets the count after a success.
- **Delayed adds** (:meth:`WorkQueue.add_after`), e.g. the backoff itself.

Pure Python (threads and a heap), no Kubernetes: unit-tested directly.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class ExponentialBackoff(Generic[K]):
    """Delay of a key's n-th failure: ``base_s * 2**n``, at most ``max_s``.

    Args:
        base_s: First delay (seconds).
        max_s: Cap (seconds).
    """

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s, self.max_s = base_s, max_s
        self._failures: dict[K, int] = {}
        self._lock = threading.Lock()

    def when(self, key: K) -> float:
        """Count one more failure of ``key``; the delay before its next try."""
        with self._lock:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        return float(min(self.base_s * 2.0 ** min(n, 62), self.max_s))

    def failures(self, key: K) -> int:
        """Failures of ``key`` since it was last forgotten."""
        with self._lock:
            return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure starts from ``base_s`` again."""
        with self._lock:
            self._failures.pop(key, None)


class WorkQueue(Generic[K]):
    """A deduplicating FIFO of keys with per-key backoff and delayed adds.

    Args:
        backoff: The per-key rate limiter of :meth:`add_rate_limited`.
        clock: Monotonic seconds (tests pass their own).
        on_depth: Called with the number of waiting keys whenever it changes (a gauge).
    """

    def __init__(self, backoff: ExponentialBackoff[K], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.backoff = backoff
        self._clock = clock
        self._on_depth = on_depth
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()  # queued or to be queued again after done()
        self._processing: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []  # (ready at, tiebreak, key)
        self._ready_at: dict[K, float] = {}
        self._seq = 0
        self._shutdown = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, key: K) -> None:
        """Queue ``key`` now (no-op if it already waits)."""
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: K, delay_s: float) -> None:
        """Queue ``key`` after ``delay_s`` seconds (an earlier pending add wins)."""
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutdown:
                return
            at = self._clock() + delay_s
            if key in self._ready_at and self._ready_at[key] <= at:
                return
            self._ready_at[key] = at
            self._seq += 1
            heapq.heappush(self._delayed, (at, self._seq, key))
            self._cond.notify()

    def add_rate_limited(self, key: K) -> float:
        """Queue ``key`` after its backoff delay; returns that delay."""
        delay = self.backoff.when(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff (its reconcile succeeded)."""
        self.backoff.forget(key)

    def get(self, timeout_s: float | None = None) -> K | None:
        """The next key to work on (the caller must call :meth:`done`), or None on timeout
        or shutdown."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._cond:
            while True:
                self._promote_locked()
                if self._queue:
                    key = self._queue.popleft()
                    self._processing.add(key)
                    self._dirty.discard(key)
                    self._depth_changed()
                    return key
                if self._shutdown:
                    return None
                now = self._clock()
                wait = None if deadline is None else deadline - now
                if wait is not None and wait <= 0:
                    return None
                if self._delayed:
                    until_next = max(self._delayed[0][0] - now, 0.0)
                    wait = until_next if wait is None else min(wait, until_next)
                self._cond.wait(wait)

    def done(self, key: K) -> None:
        """``key``'s reconcile ended; queue it again if it was added meanwhile."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._depth_changed()
                self._cond.notify()

    def shutdown(self) -> None:
        """Wake every waiting :meth:`get` with None; later adds are dropped."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    # -- internals ----------------------------------------------------------------------------

    def _add_locked(self, key: K) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # done() queues it again
        self._queue.append(key)
        self._depth_changed()
        self._cond.notify()

    def _promote_locked(self) -> None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            at, _, key = heapq.heappop(self._delayed)
            if self._ready_at.get(key) == at:
                del self._ready_at[key]
                self._add_locked(key)

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))
