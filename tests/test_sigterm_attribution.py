"""A SIGTERM at the Job's deadline is exit 11, not preemption; other SIGTERMs stay exit 7."""

from __future__ import annotations

import os
import signal

import pytest

from runner.deadline import DEADLINE_ENV, deadline_from_env, deadline_margin_s, is_deadline
from runner.errors import DeadlineExceededError, ExitCode, PreemptedError
from runner.k8s.manifests import FAIL_JOB_EXIT_CODES, IGNORE_EXIT_CODES, pod_failure_policy
from runner.train.preemption import PreemptionGuard


@pytest.mark.parametrize(
    ("elapsed", "deadline", "expected"),
    [
        (7200.0, 7200.0, True),
        (6700.0, 7200.0, True),  # within the 10-minute margin (image pull, scheduling)
        (6500.0, 7200.0, False),
        (100.0, None, False),
        (9.5, 10.0, True),
        (5.0, 10.0, False),
    ],
)
def test_is_deadline(elapsed: float, deadline: float | None, expected: bool) -> None:
    assert is_deadline(elapsed, deadline) is expected


def test_margin_and_env() -> None:
    assert deadline_margin_s(259200) == 600 and deadline_margin_s(10) == 1.0
    assert deadline_from_env({DEADLINE_ENV: "7200"}) == 7200.0
    assert deadline_from_env({DEADLINE_ENV: "soon"}) is None
    assert deadline_from_env({DEADLINE_ENV: "-1"}) is None


def _sigterm_in(guard: PreemptionGuard, phase: str) -> None:
    with guard:
        guard.on_phase(phase)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass


def test_a_sigterm_at_the_deadline_is_deadline_exceeded() -> None:
    guard = PreemptionGuard(deadline_s=0.5)  # the run has (about) used its deadline already
    guard.started_at -= 1.0
    with pytest.raises(DeadlineExceededError, match=r"deadline exceeded .* during preflight") as e:
        _sigterm_in(guard, "preflight")
    assert e.value.exit_code == ExitCode.DEADLINE_EXCEEDED == 11
    assert "not preemption" in e.value.message


def test_a_sigterm_long_before_the_deadline_is_preemption() -> None:
    guard = PreemptionGuard(deadline_s=7200)
    with pytest.raises(PreemptedError, match="preempted \\(SIGTERM\\) during loading"):
        _sigterm_in(guard, "loading")


def test_the_rendered_policy_fails_the_job_on_a_deadline_and_ignores_preemption() -> None:
    assert ExitCode.DEADLINE_EXCEEDED in FAIL_JOB_EXIT_CODES
    assert IGNORE_EXIT_CODES == (ExitCode.PREEMPTED,)
    rules = pod_failure_policy()["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert 11 in fail["onExitCodes"]["values"] and 2 in fail["onExitCodes"]["values"]


def test_the_rendered_pod_knows_its_deadline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from runner.cli import main
    from tests.conftest import REPO

    monkeypatch.setenv("QLORA_S3_ENDPOINT_URL", "http://s3.storage.svc:8333")
    spec = str(REPO / "manifests" / "example-finetunejob.yaml")
    assert main(["render", spec, "--model-config", "llama-3.1-8b"]) == 0
    job = next(d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "Job")
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env[DEADLINE_ENV] == str(job["spec"]["activeDeadlineSeconds"])
