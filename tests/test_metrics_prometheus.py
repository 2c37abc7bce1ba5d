"""A real Prometheus scrapes a running job; a real Pushgateway keeps its end after it exits.

The job here is a small driver process that goes through the phases of ``qlora run`` with the
real :class:`runner.job_metrics.JobMetrics` (server, phases, final push) and a fake training loop,
so these tests pin the serving and pushing contract without the cost of training.
``tests/test_metrics_run.py`` does the same with a real CPU ``qlora run``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from tests.fixtures.prometheus import PrometheusServer, Pushgateway, free_port

pytestmark = pytest.mark.integration

DRIVER = textwrap.dedent(
    """
    import sys, time
    from runner.job_metrics import JobMetrics
    from runner.settings import Settings
    from runner.spec import validate_document

    port, gateway, exit_code, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    spec = validate_document({
        "apiVersion": "qlora-runner.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "driver-job"},
        "spec": {
            "model": {"source": "./m"}, "dataset": {"sources": ["./d.jsonl"]},
            "output": {"uri": "file://./o"},
            "metrics": {"port": int(port), "pushgateway_url": gateway},
        },
    })
    jm = JobMetrics(Settings(metrics_bind_address="127.0.0.1"))
    code = 1
    try:
        jm.set_phase("loading")
        m = jm.open(spec, "run-1")
        jm.set_phase("preflight")
        jm.set_phase("training")
        for step in range(1, steps + 1):
            time.sleep(0.25)
            eta = 0.25 * (steps - step)
            m.set_progress(step=step, max_steps=steps, epoch=step / steps, eta_s=eta)
            m.observe_log(loss=3.0 - step * 0.1, learning_rate=1e-4, grad_norm=1.0)
            m.add_work(tokens=512, loss_tokens=200, samples=4)
        if exit_code:
            raise SystemExit(exit_code)
        jm.set_phase("verifying")
        jm.set_phase("publishing")
        code = 0
    except SystemExit as e:
        code = int(e.code)
    finally:
        jm.close(code)
    sys.exit(code)
    """
)


def run_driver(port: int, gateway: str, exit_code: int, steps: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(port), gateway, str(exit_code), str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise
    return proc.returncode, out.decode(errors="replace")


def test_prometheus_scrapes_a_running_job_and_keeps_its_pushed_end(
    start_prometheus: Callable[..., PrometheusServer], pushgateway: Pushgateway
) -> None:
    port = free_port()
    prom = start_prometheus([f"127.0.0.1:{port}"], pushgateway)
    proc = run_driver(port, pushgateway.url, exit_code=0, steps=40)
    try:
        seen = prom.wait_for('qlora_train_step{job="trainer"}', lambda r: bool(r) and r[0][1] >= 1)
        later = prom.wait_for(
            'qlora_train_step{job="trainer"}', lambda r: bool(r) and r[0][1] > seen[0][1]
        )
        assert later[0][1] > seen[0][1]  # the step advances between scrapes
        phase = prom.query('qlora_job_phase{job="trainer",phase="training"}')
        assert phase and phase[0][1] == 1
        assert prom.query('qlora_train_loss{job="trainer"}')
        info = prom.query('qlora_job_info{job="trainer"}')
        assert info[0][0]["job_name"] == "driver-job"
    finally:
        code, out = finish(proc)
    assert code == 0, out
    # The pod is gone; the Pushgateway holds the end, and Prometheus reads it from there.
    assert pushgateway.value("qlora_train_step", job="driver-job", namespace="qlora") == 40
    ended = prom.wait_for(
        'qlora_job_phase{job="driver-job",namespace="qlora",phase="succeeded"}',
        lambda r: bool(r) and r[0][1] == 1,
    )
    assert "instance" not in ended[0][0]  # honor_labels: not the gateway's own instance
    info = prom.query('qlora_job_info{job="driver-job",namespace="qlora"}')
    assert info[0][0]["job_name"] == "driver-job"
    assert prom.query('qlora_job_exit_code{job="driver-job",namespace="qlora"}')[0][1] == 0
    assert prom.query('max_over_time(qlora_job_phase{job="trainer",phase="training"}[5m])')


def test_a_failed_job_pushes_phase_failed_and_its_exit_code(pushgateway: Pushgateway) -> None:
    started = time.monotonic()
    code, out = finish(run_driver(free_port(), pushgateway.url, exit_code=6, steps=2))
    assert code == 6, out
    assert time.monotonic() - started < 30
    group = {"job": "driver-job", "namespace": "qlora"}
    assert pushgateway.value("qlora_job_phase", phase="failed", **group) == 1
    assert pushgateway.value("qlora_job_phase", phase="training", **group) == 0
    assert pushgateway.value("qlora_job_exit_code", **group) == 6
    assert pushgateway.value("qlora_train_step", **group) == 2
    end = pushgateway.value("qlora_job_end_timestamp_seconds", **group) or 0
    assert abs(end - time.time()) < 60


def test_a_job_whose_gateway_is_down_still_exits_with_its_own_code() -> None:
    started = time.monotonic()
    code, out = finish(run_driver(free_port(), f"http://127.0.0.1:{free_port()}", 0, 1))
    assert code == 0, out
    assert "push to the Pushgateway" in out
    assert time.monotonic() - started < 30
