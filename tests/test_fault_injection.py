"""Faults injected into a real ``qlora run`` process writing to a real S3 server (SeaweedFS).

* SIGTERM mid-training: a checkpoint is committed to S3, the process exits 7 with a
  termination message, and a restart (on a fresh work dir, like a new pod) resumes from the
  checkpoint and finishes with the right total step count.
* The storage server is killed mid-run: checkpoint uploads fail without stopping training,
  the publish fails after bounded retries with exit code 5 and a clear ``s3://`` message,
  nothing is published; with the server back, a rerun resumes and completes.

The kill -9 campaign is in ``tests/test_fault_kill9.py``.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from runner.errors import ExitCode
from runner.publish import verify_published
from runner.storage.s3 import S3Store
from tests.fixtures.qlora_process import run_env, started, storage_invariants, tiny_spec
from tests.fixtures.s3 import S3Bucket, SeaweedServer

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 8
EVERY = 2
WAIT_S = 240.0  # one tiny run takes ~15 s alone; the CI box is shared


def test_sigterm_mid_training_then_restart_resumes(
    tiny_model_dir: Path, tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    server = s3_bucket.server
    spec = tiny_spec(tmp_path / "job.yaml", tiny_model_dir, f"{s3_bucket.uri}/bot", steps=STEPS)
    term = tmp_path / "termination-log"
    env = run_env(server.subprocess_env(), tmp_path / "work-1", term)
    with started(spec, env, tmp_path) as run:
        assert run.wait_for(lambda r: r.get("step") == 3, WAIT_S) is not None
        sent = time.monotonic()
        run.signal(signal.SIGTERM)
        rc = run.finish(120)
        took = time.monotonic() - sent
    assert rc == ExitCode.PREEMPTED, run.text[-3000:]
    assert took < 60, f"exit took {took:.0f} s after SIGTERM"
    doc = json.loads(term.read_text())
    assert doc["status"] == "failed" and doc["exit_code"] == 7
    assert "preempted (SIGTERM) at step" in doc["reason"]
    assert "Traceback" not in run.text
    manifests = [k for k in s3_bucket.keys("bot/checkpoints/") if k.endswith("/manifest.json")]
    steps = sorted(int(k.split("/step-")[1].split("/")[0]) for k in manifests)
    assert steps and 3 <= steps[-1] < STEPS, steps
    assert f"s3://{s3_bucket.name}/bot/checkpoints/" in doc["reason"]
    assert not s3_bucket.keys("bot/runs/")

    env = run_env(server.subprocess_env(), tmp_path / "work-2", term)  # a fresh pod disk
    with started(spec, env, tmp_path) as rerun:
        rc = rerun.finish(WAIT_S)
    assert rc == ExitCode.OK, rerun.text[-3000:]
    summary = rerun.summary()
    assert summary["steps"] == STEPS
    resumed = [r for r in rerun.records if r.get("msg", "").startswith("resuming from checkpoint")]
    assert resumed and resumed[0]["checkpoint_step"] == steps[-1]
    trained = [r["step"] for r in rerun.records if "step" in r and "loss" in r]
    assert trained == list(range(steps[-1] + 1, STEPS + 1))
    assert json.loads(term.read_text())["status"] == "succeeded"
    report = verify_published(f"{s3_bucket.uri}/bot", server.settings())
    assert report.manifest["checkpoints"]["resumed_from_step"] == steps[-1]


def test_storage_killed_mid_run_exits_5_then_rerun_completes(
    tiny_model_dir: Path,
    tmp_path: Path,
    private_s3_server: SeaweedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = private_s3_server
    server.apply_env(monkeypatch)  # for this test's own reads of the store
    bucket = server.create_bucket()
    spec = tiny_spec(tmp_path / "job.yaml", tiny_model_dir, f"s3://{bucket}/bot", steps=STEPS)
    term = tmp_path / "termination-log"
    env = run_env(server.subprocess_env(), tmp_path / "work-1", term, QLORA_STORAGE_RETRIES="2")
    with started(spec, env, tmp_path) as run:
        committed = run.wait_for(lambda r: r.get("checkpoint_step") == EVERY, WAIT_S)
        assert committed is not None, run.text[-3000:]
        server.kill()
        killed = time.monotonic()
        rc = run.finish(180)
        took = time.monotonic() - killed
    assert rc == ExitCode.STORAGE, run.text[-3000:]
    assert took < 120, f"gave up {took:.0f} s after the outage: retries must be bounded"
    errors = [ln for ln in run.lines if ln.startswith("error: ")]
    assert errors and errors[0].startswith(f"error: s3://{bucket}/bot/"), run.text[-2000:]
    assert "Traceback" not in run.text
    failed_saves = [
        r for r in run.records if "not committed (training goes on)" in r.get("msg", "")
    ]
    assert failed_saves, "the checkpoint uploads during the outage must be reported"
    retries = [r for r in run.records if "retry" in r.get("msg", "").lower()]
    assert retries, "the storage layer must log its retries"
    doc = json.loads(term.read_text())
    assert doc["exit_code"] == 5 and doc["reason"].startswith(f"s3://{bucket}/")

    server.start()
    store = S3Store(bucket, server.settings())
    state = storage_invariants(store, "bot")
    assert state["runs"] == 0 and state["checkpoints"] >= 1, state
    env = run_env(server.subprocess_env(), tmp_path / "work-2", term)
    with started(spec, env, tmp_path) as rerun:
        rc = rerun.finish(WAIT_S)
    assert rc == ExitCode.OK, rerun.text[-3000:]
    assert rerun.summary()["steps"] == STEPS
    assert any(r.get("checkpoint_step") == EVERY for r in rerun.records if "resuming" in r["msg"])
    report = verify_published(f"s3://{bucket}/bot", server.settings())
    assert report.manifest["training"]["steps"] == STEPS
    assert storage_invariants(store, "bot")["runs"] == 1
