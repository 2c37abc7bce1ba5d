"""The operator's stand-in for podFailurePolicy on API servers that drop it (1.20 here)."""

from __future__ import annotations

from typing import Any

import pytest

from runner.k8s.exit_policy import POLICY_REASON, policy_failure
from runner.k8s.status import FAILED, termination_message


def _job(cond: str | None = None) -> dict[str, Any]:
    status = {"conditions": [{"type": cond, "status": "True"}]} if cond else {}
    return {"metadata": {"name": "j"}, "spec": {}, "status": status}


def _failed_pod(code: int, name: str = "p1") -> dict[str, Any]:
    term = {"exitCode": code,
            "message": termination_message(succeeded=False, reason="bad row", exit_code=code)}
    return {"metadata": {"name": name, "creationTimestamp": "2026-12-01T10:00:00Z"},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Failed",
                       "containerStatuses": [{"name": "train",
                                              "state": {"terminated": term}}]}}


@pytest.mark.parametrize("code", [2, 3, 4, 6, 10])
def test_a_fail_job_exit_code_fails_the_unfinished_job(code: int) -> None:
    got = policy_failure(_job(), [_failed_pod(code)])
    assert got is not None
    assert (got.phase, got.reason, got.exit_code, got.pod_name, got.message) == (
        FAILED, POLICY_REASON, code, "p1", "bad row")


@pytest.mark.parametrize("code", [1, 5, 7, 137])
def test_retryable_exit_codes_leave_it_to_the_job(code: int) -> None:
    assert policy_failure(_job(), [_failed_pod(code)]) is None


def test_a_finished_job_decides_itself() -> None:
    assert policy_failure(_job("Failed"), [_failed_pod(2)]) is None
    assert policy_failure(_job("Complete"), [_failed_pod(2)]) is None
    assert policy_failure(_job(), []) is None
