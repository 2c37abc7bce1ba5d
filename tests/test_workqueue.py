"""The operator's work queue: dedup, one worker per key, per-key backoff, delayed adds."""

from __future__ import annotations

import threading

import pytest

from runner.k8s.workqueue import ExponentialBackoff, WorkQueue

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_queued_once_however_many_events_arrive() -> None:
    q: WorkQueue[str] = WorkQueue(ExponentialBackoff(0.1, 10))
    for _ in range(50):
        q.add("ns/a")
    q.add("ns/b")
    assert len(q) == 2
    assert [q.get(0), q.get(0), q.get(0)] == ["ns/a", "ns/b", None]


def test_a_key_added_while_in_progress_comes_back_once_after_done() -> None:
    q: WorkQueue[str] = WorkQueue(ExponentialBackoff(0.1, 10))
    q.add("a")
    assert q.get(0) == "a"
    q.add("a")
    q.add("a")
    assert q.get(0) is None  # never handed to a second worker while the first works on it
    q.done("a")
    assert q.get(0) == "a"
    q.done("a")
    assert q.get(0) is None


@pytest.mark.parametrize(("failures", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (9, 128.0),
                                                 (10, 256.0), (11, 300.0), (60, 300.0)],
                         ids=lambda v: str(v))
def test_backoff_doubles_per_failure_up_to_the_cap(failures: int, delay: float) -> None:
    b: ExponentialBackoff[str] = ExponentialBackoff(0.5, 300)
    got = [b.when("k") for _ in range(failures)]
    assert got[-1] == delay
    assert b.when("other") == 0.5  # per key
    b.forget("k")
    assert b.when("k") == 0.5


def test_a_failing_key_waits_its_backoff_while_others_go_first() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(ExponentialBackoff(1.0, 60), clock=clock)
    for _ in range(3):
        q.add_rate_limited("bad")  # three failures: 1, 2, 4 s (the earliest pending wins)
    q.add("good-1")
    q.add("good-2")
    assert [q.get(0), q.get(0), q.get(0)] == ["good-1", "good-2", None]
    clock.now += 0.99
    assert q.get(0) is None
    clock.now += 0.02
    assert q.get(0) == "bad"
    assert q.backoff.failures("bad") == 3
    assert q.backoff.when("bad") == 8.0


def test_a_waiting_get_wakes_for_an_add_and_for_shutdown() -> None:
    q: WorkQueue[str] = WorkQueue(ExponentialBackoff(0.1, 1))
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(10)))
    t.start()
    q.add("x")
    t.join(5)
    assert got == ["x"]
    t = threading.Thread(target=lambda: got.append(q.get(10)))
    t.start()
    q.shutdown()
    t.join(5)
    assert got == ["x", None] and not t.is_alive()


def test_delayed_adds_arrive_in_time_on_the_real_clock() -> None:
    depths: list[int] = []
    q: WorkQueue[str] = WorkQueue(ExponentialBackoff(0.1, 1), on_depth=depths.append)
    q.add_after("later", 0.2)
    q.add_after("sooner", 0.05)
    assert q.get(2) == "sooner"
    assert q.get(2) == "later"
    assert depths and depths[-1] == 0
