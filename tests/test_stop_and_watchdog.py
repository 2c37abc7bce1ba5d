"""A user's SIGTERM is not preemption (exit 12), and a stuck phase is reported as stuck (13).

* Pod identity: ``QLORA_POD_NAME`` (rendered from the downward API) or the kubelet's
  ``KUBERNETES_SERVICE_HOST``; without either a SIGTERM is the user's own stop.
* A real ``qlora run`` of the tiny model outside a pod, stopped by SIGTERM mid-training,
  commits its checkpoint and exits 12 saying so.
* The watchdog on its own (milliseconds, a sleeping "phase"), and in a real ``qlora run``
  whose loading budget is 0.01 s: exit 13, the phase named in the log and the termination
  message, in bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from runner.deadline import POD_NAME_ENV, SERVICE_HOST_ENV, in_pod
from runner.errors import ExitCode, PreemptedError, StoppedError, StuckError
from runner.k8s.manifests import FAIL_JOB_EXIT_CODES, IGNORE_EXIT_CODES, pod_failure_policy
from runner.settings import Settings
from runner.train.preemption import PreemptionGuard
from runner.watchdog import BUDGET_SETTINGS, Watchdog
from tests.fixtures.qlora_process import run_env, started, tiny_spec

WAIT_S = 240.0  # one tiny run takes ~15 s alone; the CI box is shared


def _local_env(base: dict[str, str]) -> dict[str, str]:
    """``base`` without any pod identity (a laptop, a CI runner)."""
    return {k: v for k, v in base.items() if k not in (POD_NAME_ENV, SERVICE_HOST_ENV)}


def test_pod_identity_from_the_environment() -> None:
    assert in_pod({POD_NAME_ENV: "job-abc-0"}) and in_pod({SERVICE_HOST_ENV: "10.96.0.1"})
    assert not in_pod({}) and not in_pod({POD_NAME_ENV: ""})


def _sigterm_in(guard: PreemptionGuard, phase: str) -> None:
    with guard:
        guard.on_phase(phase)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass


def test_a_sigterm_outside_a_pod_is_a_stop_not_preemption(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (POD_NAME_ENV, SERVICE_HOST_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StoppedError, match=r"stopped by a signal .* during preflight") as e:
        _sigterm_in(PreemptionGuard(deadline_s=7200), "preflight")
    assert e.value.exit_code == ExitCode.STOPPED == 12
    assert "not preemption" in e.value.message
    monkeypatch.setenv(POD_NAME_ENV, "job-abc-0")
    with pytest.raises(PreemptedError):
        _sigterm_in(PreemptionGuard(deadline_s=7200), "preflight")


def test_the_rendered_policy_is_explicit_about_12_and_13() -> None:
    assert ExitCode.STOPPED in FAIL_JOB_EXIT_CODES
    assert ExitCode.STUCK not in FAIL_JOB_EXIT_CODES and IGNORE_EXIT_CODES == (ExitCode.PREEMPTED,)
    fail = next(r for r in pod_failure_policy()["rules"] if r["action"] == "FailJob")
    assert 12 in fail["onExitCodes"]["values"] and 13 not in fail["onExitCodes"]["values"]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_a_local_run_commits_a_checkpoint_and_exits_12(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    spec = tiny_spec(tmp_path / "job.yaml", tiny_model_dir, f"file://{store}", steps=8)
    term = tmp_path / "termination-log"
    env = _local_env(run_env(dict(os.environ), tmp_path / "work", term))
    with started(spec, env, tmp_path) as run:
        assert run.wait_for(lambda r: r.get("step") == 3, WAIT_S) is not None
        run.signal(signal.SIGTERM)
        rc = run.finish(120)
    assert rc == ExitCode.STOPPED, run.text[-3000:]
    doc = json.loads(term.read_text())
    assert doc["exit_code"] == 12 and "stopped by a signal" in doc["reason"]
    assert "checkpoint committed to" in doc["reason"] and "Traceback" not in run.text
    said = [r for r in run.records if r.get("stopped") is True]
    assert said and "stopped by a signal outside Kubernetes" in said[0]["msg"]
    assert list(store.glob("checkpoints/*/step-*/manifest.json"))
    assert not list(store.glob("runs/*"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_budgets_phases_and_training_progress() -> None:
    clock = FakeClock()
    dog = Watchdog({"preflight": 10.0, "training": 5.0}, on_expiry=lambda e: None, clock=clock)
    dog.on_phase("preflight")
    clock.now += 9.9
    assert dog.expired() is None
    clock.now += 0.2
    error = dog.expired()
    assert isinstance(error, StuckError) and error.exit_code == ExitCode.STUCK == 13
    assert "stuck in preflight: ran 10.1 s, over its budget of 10 s" in error.message
    assert "QLORA_PREFLIGHT_BUDGET_S" in error.message

    dog.on_phase("training")  # bounded by progress, not by the phase's length
    for _ in range(10):
        clock.now += 4.0
        dog.progress()
        assert dog.expired() is None
    clock.now += 5.0
    stuck = dog.expired()
    assert stuck is not None and "no optimizer step for 5.0 s" in stuck.message
    assert "QLORA_TRAINING_STALL_S" in stuck.message
    dog.on_phase("failed")
    assert dog.expired() is None
    dog.stop()


def test_watchdog_fires_on_a_sleeping_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("QLORA_TERMINATION_LOG", str(term))
    fired = threading.Event()
    dog = Watchdog({"preflight": 0.05}, on_expiry=lambda e: fired.set())
    started_at = time.monotonic()
    dog.on_phase("preflight")
    assert fired.wait(5.0), "the watchdog did not fire"  # the phase "sleeps"
    assert time.monotonic() - started_at < 5.0
    dog.stop()
    record = next(r for r in caplog.records if getattr(r, "stuck", False))
    assert record.phase == "preflight" and record.budget_s == 0.05  # type: ignore[attr-defined]
    assert record.phase_s >= 0.05  # type: ignore[attr-defined]
    doc = json.loads(term.read_text())
    assert doc["exit_code"] == 13 and doc["reason"].startswith("stuck in preflight")


def test_watchdog_stops_when_the_run_ends() -> None:
    fired = threading.Event()
    dog = Watchdog({"loading": 0.05}, on_expiry=lambda e: fired.set())
    dog.on_phase("loading")
    dog.on_phase("succeeded")
    assert not fired.wait(0.3)


def test_every_phase_budget_is_a_setting_with_a_generous_default() -> None:
    settings = Settings()
    for phase, field in BUDGET_SETTINGS.items():
        assert getattr(settings, field) >= 1800, phase
    dog = Watchdog.from_settings(Settings(preflight_budget_s=0.5))
    assert dog.budgets["preflight"] == 0.5 and set(dog.budgets) == set(BUDGET_SETTINGS)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stuck_loading_phase_in_qlora_run_exits_13(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "job.yaml", tiny_model_dir, f"file://{tmp_path / 'store'}")
    term = tmp_path / "termination-log"
    env = run_env(dict(os.environ), tmp_path / "work", term, QLORA_LOADING_BUDGET_S="0.01")
    sent = time.monotonic()
    with started(spec, env, tmp_path) as run:
        rc = run.finish(WAIT_S)
    took = time.monotonic() - sent
    assert rc == ExitCode.STUCK, run.text[-3000:]
    assert took < WAIT_S
    doc = json.loads(term.read_text())
    assert doc["status"] == "failed" and doc["exit_code"] == 13
    assert doc["reason"].startswith("stuck in loading: ran ")
    stuck = [r for r in run.records if r.get("stuck") is True]
    assert stuck and stuck[0]["phase"] == "loading" and stuck[0]["budget_s"] == 0.01
    assert stuck[0]["level"] == "error", stuck[0]
    assert "Traceback" not in run.text
