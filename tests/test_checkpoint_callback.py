"""The checkpoint schedule and the SIGTERM guard, driven directly (no trainer, milliseconds).

The callback is called the way ``transformers.Trainer`` calls it (``on_step_end`` then, when it
asked for a save, ``on_save`` after the trainer wrote ``checkpoint-<step>/``); the store is a
real ``file://`` store, or one that fails like an unreachable S3.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from runner.checkpoints import CheckpointStore
from runner.deadline import POD_NAME_ENV
from runner.errors import PreemptedError, StorageError
from runner.storage import LocalStore
from runner.train import preemption
from runner.train.preemption import PreemptionGuard, checkpoint_is_final, make_checkpoint_callback

HASH = "cd" * 32


@pytest.fixture(autouse=True)
def _in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """These guards run as in a pod, where a SIGTERM is preemption (exit 7)."""
    monkeypatch.setenv(POD_NAME_ENV, "tiny-run-0")


class Observer:
    def __init__(self) -> None:
        self.committed: list[int] = []
        self.failed = 0

    def checkpoint_committed(self, step: int) -> None:
        self.committed.append(step)

    def checkpoint_failed(self) -> None:
        self.failed += 1


class DownStore(LocalStore):
    """A store whose every call fails as an unreachable S3 does after its retries."""

    def head(self, key: str) -> Any:
        raise StorageError(f"s3://bucket/{key}: endpoint unreachable after 2 retries")


def store(tmp_path: Path, cls: type[LocalStore] = LocalStore) -> CheckpointStore:
    return CheckpointStore(cls(tmp_path / "store"), f"checkpoints/{HASH}", {"training_hash": HASH})


def trainer_args(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(tmp_path / "trainer"))


def state(step: int, max_steps: int = 10) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=max_steps)


def control() -> SimpleNamespace:
    return SimpleNamespace(should_save=False, should_training_stop=False)


def write_checkpoint(tmp_path: Path, step: int) -> None:
    folder = tmp_path / "trainer" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(os.urandom(64))
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}, "max_steps": 10}}')


def saves(callback: Any, steps: range, max_steps: int = 10) -> list[int]:
    out = []
    for step in steps:
        c = callback.on_step_end(None, state(step, max_steps), control())
        if c.should_save:
            out.append(step)
    return out


def test_every_n_steps_and_the_last_step(tmp_path: Path) -> None:
    cb = make_checkpoint_callback(
        store(tmp_path), PreemptionGuard(), every_steps=3, every_minutes=None
    )
    assert saves(cb, range(1, 11)) == [3, 6, 9, 10]


def test_every_m_minutes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    cb = make_checkpoint_callback(
        store(tmp_path), PreemptionGuard(), every_steps=None, every_minutes=2.0
    )
    cb.on_train_begin(None, state(0), control())
    due = []
    for step in range(1, 10):
        now[0] += 50.0  # 50 s per step: due every 120 s of wall time
        c = cb.on_step_end(None, state(step, 100), control())
        if c.should_save:
            due.append(step)
            write_checkpoint(tmp_path, step)
            cb.on_save(trainer_args(tmp_path), state(step, 100), c)
    assert due == [3, 6, 9]


def test_save_uploads_commits_and_drops_older_local_folders(tmp_path: Path) -> None:
    observer = Observer()
    ck = store(tmp_path)
    cb = make_checkpoint_callback(
        ck, PreemptionGuard(), every_steps=2, every_minutes=None, observer=observer
    )
    for step in (2, 4):
        write_checkpoint(tmp_path, step)
        cb.on_save(trainer_args(tmp_path), state(step), control())
    assert [c.step for c in ck.committed()] == [4, 2]
    assert observer.committed == [2, 4] and observer.failed == 0
    assert sorted(p.name for p in (tmp_path / "trainer").iterdir()) == ["checkpoint-4"]


def test_a_failed_periodic_upload_does_not_stop_training(tmp_path: Path) -> None:
    observer = Observer()
    cb = make_checkpoint_callback(
        store(tmp_path, DownStore),
        PreemptionGuard(),
        every_steps=2,
        every_minutes=None,
        observer=observer,
    )
    write_checkpoint(tmp_path, 2)
    cb.on_save(trainer_args(tmp_path), state(2), control())  # no exception
    assert cb.failed_steps == [2] and observer.failed == 1


def test_sigterm_saves_stops_and_raises_preempted_after_the_commit(tmp_path: Path) -> None:
    ck = store(tmp_path)
    guard = PreemptionGuard()
    cb = make_checkpoint_callback(ck, guard, every_steps=None, every_minutes=None)
    raised = pytest.raises(PreemptedError, match=r"at step 5/10.*step-00000005")
    with guard, raised, guard.training():
        os.kill(os.getpid(), signal.SIGTERM)
        c = cb.on_step_end(None, state(5), control())
        assert c.should_save and c.should_training_stop
        write_checkpoint(tmp_path, 5)
        cb.on_save(trainer_args(tmp_path), state(5), c)
    assert [c.step for c in ck.committed()] == [5]


def test_sigterm_with_storage_down_is_a_storage_error_not_a_claimed_checkpoint(
    tmp_path: Path,
) -> None:
    guard = PreemptionGuard()
    cb = make_checkpoint_callback(
        store(tmp_path, DownStore), guard, every_steps=None, every_minutes=None
    )
    with guard, pytest.raises(StorageError, match="unreachable"), guard.training():
        os.kill(os.getpid(), signal.SIGTERM)
        write_checkpoint(tmp_path, 3)
        cb.on_save(trainer_args(tmp_path), state(3), control())


def test_guard_outside_training_raises_at_once_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    guard = PreemptionGuard()
    with pytest.raises(PreemptedError, match="during preflight"), guard:
        guard.on_phase("preflight")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_after_the_last_step_stops_when_training_returns() -> None:
    guard = PreemptionGuard()
    raised = pytest.raises(PreemptedError, match="verification and publishing")
    with guard, raised, guard.training():
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.preempted


@pytest.mark.parametrize(
    ("text", "final"),
    [
        ('{"global_step": 10, "max_steps": 10}', True),
        ('{"global_step": 9, "max_steps": 10}', False),
        ('{"global_step": 0, "max_steps": 0}', False),
        ("not json", False),
    ],
)
def test_checkpoint_is_final(tmp_path: Path, text: str, final: bool) -> None:
    (tmp_path / "trainer_state.json").write_text(text)
    assert checkpoint_is_final(tmp_path) is final
    assert checkpoint_is_final(tmp_path / "missing") is False
