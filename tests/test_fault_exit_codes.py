"""Failure classes: each ends ``qlora run`` with its own exit code and a termination message
that the operator's reader (:func:`runner.k8s.status.parse_termination_message`) understands,
and the rendered Job's ``podFailurePolicy`` maps those codes as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import termination
from runner.cli import main
from runner.errors import (
    DataError,
    ExitCode,
    OutOfMemoryError,
    PreemptedError,
    RunnerError,
    SpecError,
    StorageError,
)
from runner.k8s.manifests import DEFAULT_POLICY, FAIL_JOB_EXIT_CODES, IGNORE_EXIT_CODES
from runner.k8s.status import parse_termination_message
from runner.train.preemption import GRACE_PERIOD_S


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SpecError("spec.training.max_steps: must be >= 1"), ExitCode.INVALID_INPUT),
        (DataError("dataset.sources[0]: row 3: not JSON"), ExitCode.INVALID_INPUT),
        (StorageError("s3://b/k: endpoint unreachable after 5 retries"), ExitCode.STORAGE),
        (OutOfMemoryError("CUDA out of memory during training"), ExitCode.CUDA_OOM),
        (PreemptedError("preempted (SIGTERM) at step 4/8"), ExitCode.PREEMPTED),
        (RuntimeError("boom"), ExitCode.INTERNAL),
    ],
    ids=["spec", "data", "storage", "oom", "preempted", "bug"],
)
def test_failure_message_round_trips_through_the_operators_reader(
    error: BaseException, code: ExitCode
) -> None:
    line = termination.failure_message(error)
    assert "\n" not in line
    parsed = parse_termination_message(line, exit_code=None)
    assert not parsed.succeeded
    assert parsed.exit_code == int(code)
    expected = error.message if isinstance(error, RunnerError) else "internal error: RuntimeError"
    assert parsed.reason.startswith(expected)


def test_success_message_carries_the_adapter_uri() -> None:
    parsed = parse_termination_message(termination.success_message("s3://a/runs/x"), 0)
    assert parsed.succeeded and parsed.adapter_uri == "s3://a/runs/x"


def test_reason_is_redacted() -> None:
    err = StorageError("s3://b/k: denied; aws_secret_access_key=wJalrXUtnFEMIK7MDENG")
    line = termination.failure_message(err)
    assert "wJalrXUtnFEMIK7MDENG" not in line
    assert "[REDACTED]" in line


def test_path_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(termination.ENV_PATH, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert termination.termination_log_path() is None  # a laptop: never write into /dev
    assert termination.report("{}") is False
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert termination.termination_log_path() == "/dev/termination-log"
    target = tmp_path / "termination-log"
    monkeypatch.setenv(termination.ENV_PATH, str(target))
    assert termination.report('{"status": "failed"}') is True
    assert target.read_text() == '{"status": "failed"}\n'
    monkeypatch.setenv(termination.ENV_PATH, str(tmp_path / "missing-dir" / "log"))
    assert termination.report("{}") is False  # logged, never raised


def test_invalid_spec_exits_2_with_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("apiVersion: qlora-runner.io/v1alpha1\nkind: FineTuneJob\nmetadata: {}\n")
    log_file = tmp_path / "termination-log"
    monkeypatch.setenv(termination.ENV_PATH, str(log_file))
    assert main(["run", "--spec", str(spec)]) == ExitCode.INVALID_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    doc = json.loads(log_file.read_text())
    assert doc["status"] == "failed" and doc["exit_code"] == 2
    assert doc["reason"]


def test_pod_failure_policy_matches_the_failure_classes() -> None:
    """Invalid input and OOM fail the Job at once (OOM: the operator re-plans, a retry of the
    same pod would OOM again); preemption is ignored (never counts against backoffLimit);
    storage outages and bugs are retried by the backoff limit."""
    assert ExitCode.INVALID_INPUT in FAIL_JOB_EXIT_CODES
    assert ExitCode.CUDA_OOM in FAIL_JOB_EXIT_CODES
    assert IGNORE_EXIT_CODES == (ExitCode.PREEMPTED,)
    assert ExitCode.STORAGE not in FAIL_JOB_EXIT_CODES
    assert ExitCode.INTERNAL not in FAIL_JOB_EXIT_CODES


def test_grace_period_matches_the_rendered_job() -> None:
    assert DEFAULT_POLICY.termination_grace_s == GRACE_PERIOD_S


def test_every_replan_attempt_is_visible_in_the_pods_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rendered Job of re-plan N labels its pod ``attempt=N`` and hands the label to the
    runner (downward API), which exports it as ``qlora_job_attempt``."""
    from runner.job_metrics import JobMetrics
    from runner.k8s import names
    from runner.k8s.manifests import render_objects
    from runner.plan.types import GpuClass, Plan
    from runner.settings import Settings
    from runner.spec import load_spec_text, spec_hash

    spec = load_spec_text(
        "apiVersion: qlora-runner.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: oom}\n"
        "spec:\n  model: {source: /models/m}\n  dataset: {sources: [/data/d.jsonl]}\n"
        "  output: {uri: file:///data/out}\n"
    )
    plan = Plan(
        spec_hash=spec_hash(spec),
        gpu_class=GpuClass("24GB", 22500),
        backend="unsloth",
        quant_mode="4bit",
        micro_batch_size=2,
        gradient_accumulation_steps=8,
        vram_terms=(),
        vram_estimate_bytes=1,
        host_memory_bytes=1 << 30,
        cpu_cores=4,
        tokens_per_step=1,
    )
    job = next(o for o in render_objects(spec, plan, Settings(), attempt=2) if o["kind"] == "Job")
    template = job["spec"]["template"]
    assert template["metadata"]["labels"][names.LABEL_ATTEMPT] == "2"
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    field = env["QLORA_ATTEMPT"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == f"metadata.labels['{names.LABEL_ATTEMPT}']"

    monkeypatch.setenv("QLORA_ATTEMPT", "2")  # what the kubelet resolves that field to
    metrics = JobMetrics(Settings())
    assert metrics.metrics.value("qlora_job_attempt") == 2
