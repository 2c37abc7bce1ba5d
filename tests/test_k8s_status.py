"""Pure tests of the termination-message contract and of how Job/pod state is summarised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.k8s.status import (
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    job_progress,
    parse_termination_message,
    set_condition,
    termination_message,
    write_termination_message,
)


@pytest.mark.parametrize(
    ("text", "exit_code", "succeeded", "uri", "reason", "code"),
    [
        (termination_message(succeeded=True, adapter_uri="s3://a/b/runs/1"), 0, True,
         "s3://a/b/runs/1", "", 0),
        (termination_message(succeeded=False, reason="CUDA out of memory", exit_code=6), 6,
         False, None, "CUDA out of memory", 6),
        # FallbackToLogsOnError: the last log lines, no JSON
        ("loading model\nTraceback ...\nRuntimeError: boom\n", 1, False, None,
         "RuntimeError: boom", 1),
        ("", 137, False, None, "exit code 137", 137),
        ("", 0, True, None, "", 0),
        # a JSON line after some log output still wins
        ('step 3\n{"status": "succeeded", "adapter_uri": "file:///x"}', 0, True, "file:///x",
         "", 0),
    ],
    ids=["success", "oom", "fallback-logs", "killed", "empty-ok", "json-after-logs"],
)
def test_parse_termination_message(
    text: str, exit_code: int, succeeded: bool, uri: str | None, reason: str, code: int
) -> None:
    t = parse_termination_message(text, exit_code)
    assert (t.succeeded, t.adapter_uri, t.reason, t.exit_code) == (succeeded, uri, reason, code)


def test_termination_message_is_one_short_json_line() -> None:
    line = termination_message(succeeded=False, reason="a\nb " + "x" * 10_000, exit_code=5)
    assert "\n" not in line and len(line) < 4096
    assert json.loads(line)["reason"].startswith("a b x")


def test_write_termination_message(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    assert write_termination_message('{"status": "succeeded"}', str(path))
    assert path.read_text() == '{"status": "succeeded"}\n'
    assert not write_termination_message("x", str(tmp_path / "missing" / "log"))


def _job(cond: str | None = None, reason: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {}
    if cond:
        status["conditions"] = [{"type": cond, "status": "True", "reason": reason,
                                 "message": "Job has reached the specified backoff limit"}]
    return {"metadata": {"name": "j"}, "spec": {}, "status": status}


def _pod(phase: str, node: str | None = "n1", term: dict[str, Any] | None = None,
         created: str = "2026-11-28T10:00:00Z") -> dict[str, Any]:
    cs = [{"name": "train", "state": {"terminated": term}}] if term else []
    return {"metadata": {"name": f"p-{phase.lower()}", "creationTimestamp": created},
            "spec": {"nodeName": node} if node else {},
            "status": {"phase": phase, "containerStatuses": cs}}


def test_job_progress_phases() -> None:
    assert job_progress(_job(), []).phase == PENDING
    pending = job_progress(_job(), [_pod("Pending", node=None)])
    assert pending.phase == PENDING and "waiting for a node" in pending.message
    assert job_progress(_job(), [_pod("Running")]).phase == RUNNING
    ok = job_progress(_job("Complete"), [_pod("Succeeded", term={
        "exitCode": 0, "message": termination_message(succeeded=True, adapter_uri="s3://x/y")})])
    assert (ok.phase, ok.adapter_uri, ok.finished) == (SUCCEEDED, "s3://x/y", True)
    failed = job_progress(_job("Failed", "BackoffLimitExceeded"), [_pod("Failed", term={
        "exitCode": 2, "message": termination_message(succeeded=False, reason="bad data",
                                                      exit_code=2)})])
    assert (failed.phase, failed.reason, failed.message, failed.exit_code) == (
        FAILED, "BackoffLimitExceeded", "bad data", 2)
    deadline = job_progress(_job("Failed", "DeadlineExceeded"), [])
    assert deadline.phase == FAILED and "backoff limit" in deadline.message


def test_set_condition_moves_transition_time_only_on_a_flip() -> None:
    conds = set_condition([], "Running", False, "Pending", "waiting", 1)
    t0 = conds[0]["lastTransitionTime"]
    conds[0]["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    same = set_condition(conds, "Running", False, "Pending", "still waiting", 1)
    assert same[0]["lastTransitionTime"] == "2000-01-01T00:00:00Z"
    flipped = set_condition(same, "Running", True, "PodRunning", "runs", 1)
    assert flipped[0]["lastTransitionTime"] >= t0 and flipped[0]["status"] == "True"
    ordered = set_condition(flipped, "Planned", True, "Planned", "24GB", 1)
    assert [c["type"] for c in ordered] == ["Planned", "Running"]
