"""RunMetrics, the /metrics server and the Pushgateway push (no training needed).

Unit tests check the registry a platform team would scrape: names and units, one series per
phase, label cardinality, ``promtool check metrics``. Integration tests serve and push to a
real Pushgateway, including one that is down and one that never answers.
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import time
import urllib.error

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from runner.metrics import (
    DeviceMemory,
    MetricsServer,
    Phase,
    RunMetrics,
    push_metrics,
)
from tests.conftest import require_binary
from tests.fixtures.prometheus import Pushgateway, free_port, http_get

GIB = 1024**3
# rank / world_size: a handful of values per job (data-parallel ranks)
ALLOWED_LABELS = {
    "job_name", "backend", "gpu_class", "quant_mode", "phase", "device", "rank", "world_size"
}  # fmt: skip
EXPECTED = {
    "qlora_job_info": "gauge",
    "qlora_job_phase": "gauge",
    "qlora_job_phase_duration_seconds": "gauge",
    "qlora_job_start_timestamp_seconds": "gauge",
    "qlora_job_end_timestamp_seconds": "gauge",
    "qlora_job_exit_code": "gauge",
    "qlora_job_attempt": "gauge",
    "qlora_vram_estimate_bytes": "gauge",
    "qlora_vram_usable_bytes": "gauge",
    "qlora_gpu_memory_allocated_bytes": "gauge",
    "qlora_gpu_memory_reserved_bytes": "gauge",
    "qlora_gpu_memory_peak_allocated_bytes": "gauge",
    "qlora_gpu_memory_peak_reserved_bytes": "gauge",
    "qlora_gpu_memory_total_bytes": "gauge",
    "qlora_train_step": "gauge",
    "qlora_train_max_steps": "gauge",
    "qlora_train_epoch": "gauge",
    "qlora_train_loss": "gauge",
    "qlora_train_learning_rate": "gauge",
    "qlora_train_grad_norm": "gauge",
    "qlora_train_eta_seconds": "gauge",
    "qlora_train_tokens": "counter",
    "qlora_train_loss_tokens": "counter",
    "qlora_train_samples": "counter",
    "qlora_train_tokens_per_second": "gauge",
    "qlora_train_loss_tokens_per_second": "gauge",
    "qlora_train_samples_per_second": "gauge",
    "qlora_rank_info": "gauge",
    "qlora_rank_gpu_memory_peak_reserved_bytes": "gauge",
    "qlora_rank_train_tokens_per_second": "gauge",
    "qlora_train_micro_batch_size": "gauge",
    "qlora_train_gradient_accumulation_steps": "gauge",
    "qlora_checkpoint_last_step": "gauge",
    "qlora_checkpoint_last_timestamp_seconds": "gauge",
    "qlora_checkpoint_failures": "counter",
    "qlora_resumed_from_step": "gauge",
    "qlora_eval_loss": "gauge",
    "qlora_eval_perplexity": "gauge",
    "qlora_eval_accuracy_ratio": "gauge",
    "qlora_eval_rows": "gauge",
    "qlora_eval_gate_passed": "gauge",
}


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def busy_run(clock: FakeClock | None = None) -> RunMetrics:
    """A RunMetrics with every kind of value set, two GPUs, mid-training."""
    m = RunMetrics(CollectorRegistry(), clock=clock or FakeClock())
    m.set_job("support-bot", backend="unsloth", gpu_class="24GB", quant_mode="4bit")
    m.set_plan(
        vram_estimate_bytes=18 * GIB,
        usable_bytes=22 * GIB,
        micro_batch_size=4,
        gradient_accumulation_steps=4,
    )
    m.start()
    m.set_phase(Phase.LOADING)
    m.set_phase(Phase.TRAINING)
    for i in range(2):
        m.set_memory(DeviceMemory(f"cuda:{i}", 10 * GIB, 12 * GIB, 15 * GIB, 16 * GIB, 24 * GIB))
    m.set_progress(step=7, max_steps=100, epoch=0.07, eta_s=930.0)
    m.observe_log(loss=1.25, learning_rate=2e-4, grad_norm=0.5)
    m.add_work(tokens=7 * 16 * 2048, loss_tokens=7 * 16 * 900, samples=7 * 16)
    m.set_rates(tokens_per_s=8000.0, loss_tokens_per_s=3500.0, samples_per_s=3.9)
    return m


def families(m: RunMetrics) -> dict[str, object]:
    """Metric families by name, without prometheus_client's ``<counter>_created`` companions."""
    fams = text_string_to_metric_families(m.exposition().decode())
    return {f.name: f for f in fams if not f.name.endswith("_created")}


def test_evaluation_gauges_carry_base_and_adapter() -> None:
    m = busy_run()
    scores = {"loss": 2.0, "perplexity": 7.389, "accuracy": 0.5}
    m.set_evaluation(
        {
            "base": scores,
            "adapter": {**scores, "loss": 1.5, "accuracy": None},
            "rows": 900,
            "gate": {"passed": False},
        }
    )
    assert m.value("qlora_eval_loss", model="adapter") == 1.5
    assert m.value("qlora_eval_accuracy_ratio", model="base") == 0.5
    assert m.value("qlora_eval_accuracy_ratio", model="adapter") is None
    assert m.value("qlora_eval_rows") == 900 and m.value("qlora_eval_gate_passed") == 0


def test_every_metric_is_exposed_with_its_type_and_help() -> None:
    fams = families(busy_run())
    assert {name: f.type for name, f in fams.items()} == EXPECTED  # type: ignore[attr-defined]
    for name, f in fams.items():
        assert f.documentation, name  # type: ignore[attr-defined]


def test_values_read_back() -> None:
    m = busy_run()
    assert m.value("qlora_train_step") == 7
    assert m.value("qlora_train_loss") == 1.25
    assert m.value("qlora_train_tokens_total") == 7 * 16 * 2048
    assert m.value("qlora_gpu_memory_peak_reserved_bytes", device="cuda:1") == 16 * GIB
    assert m.value("qlora_vram_estimate_bytes") == 18 * GIB
    assert (
        m.value(
            "qlora_job_info",
            job_name="support-bot",
            backend="unsloth",
            gpu_class="24GB",
            quant_mode="4bit",
        )
        == 1
    )


def test_values_not_logged_yet_are_nan_not_zero() -> None:
    """Before the trainer's first log a loss of 0 would read as a perfect model."""
    m = RunMetrics()
    for name in (
        "qlora_train_loss",
        "qlora_train_learning_rate",
        "qlora_train_grad_norm",
        "qlora_train_eta_seconds",
    ):
        value = m.value(name)
        assert value is not None and math.isnan(value), name
    m.observe_log(loss=2.0)
    assert m.value("qlora_train_loss") == 2.0
    assert b"qlora_train_loss NaN" not in m.exposition()


def test_the_global_registry_is_never_used() -> None:
    busy_run()
    names = {f.name for f in REGISTRY.collect()}
    assert not any(n.startswith("qlora_") for n in names)


def test_two_runs_in_one_process_do_not_share_values() -> None:
    a, b = RunMetrics(), RunMetrics()
    a.set_progress(step=3, max_steps=10, epoch=0.3)
    assert b.value("qlora_train_step") == 0


def test_exactly_one_phase_is_set_and_time_is_booked_per_phase() -> None:
    clock = FakeClock()
    m = RunMetrics(clock=clock)
    for phase, seconds in [
        (Phase.LOADING, 5),
        (Phase.PREFLIGHT, 2),
        (Phase.TRAINING, 60),
        (Phase.VERIFYING, 3),
    ]:
        m.set_phase(phase)
        on = [p for p in Phase if m.value("qlora_job_phase", phase=p.value) == 1]
        assert on == [phase]
        clock.now += seconds
    m.finish(0)
    assert m.value("qlora_job_phase", phase="succeeded") == 1
    assert m.value("qlora_job_phase", phase="verifying") == 0
    assert m.value("qlora_job_phase_duration_seconds", phase="training") == 60
    assert m.value("qlora_job_phase_duration_seconds", phase="verifying") == 3
    assert m.value("qlora_job_exit_code") == 0
    assert m.value("qlora_job_end_timestamp_seconds") == clock.now


@pytest.mark.parametrize(
    ("exit_code", "phase"), [(0, "succeeded"), (2, "failed"), (6, "failed")], ids=str
)
def test_finish_sets_the_final_phase_from_the_exit_code(exit_code: int, phase: str) -> None:
    m = busy_run()
    m.finish(exit_code)
    assert m.current_phase == Phase(phase)
    assert m.value("qlora_job_exit_code") == exit_code
    assert sum(m.value("qlora_job_phase", phase=p.value) or 0 for p in Phase) == 1


def test_labels_stay_low_cardinality() -> None:
    m = busy_run()
    m.set_job("support-bot", backend="transformers", gpu_class="48GB", quant_mode="16bit")
    for step in range(50):  # many steps and phase changes add no series
        m.set_progress(step=step, max_steps=100, epoch=step / 100, eta_s=1.0)
        m.set_phase(Phase.TRAINING if step % 2 else Phase.VERIFYING)
    fams = families(m)
    label_names = {k for f in fams.values() for s in f.samples for k in s.labels}  # type: ignore[attr-defined]
    assert label_names <= ALLOWED_LABELS
    info = list(fams["qlora_job_info"].samples)  # type: ignore[attr-defined]
    assert len(info) == 1 and info[0].labels["backend"] == "transformers"
    assert len(fams["qlora_job_phase"].samples) == len(Phase)  # type: ignore[attr-defined]
    total = sum(len(f.samples) for f in fams.values())  # type: ignore[attr-defined]
    assert total < 80


def test_counters_ignore_negative_amounts() -> None:
    m = RunMetrics()
    m.add_work(tokens=100, loss_tokens=40, samples=2)
    m.add_work(tokens=-5, loss_tokens=-1, samples=-1)
    assert m.value("qlora_train_tokens_total") == 100
    assert m.value("qlora_train_samples_total") == 2


@pytest.mark.parametrize("started", [True, False], ids=["busy", "fresh"])
def test_promtool_check_metrics_is_clean(started: bool) -> None:
    promtool = require_binary("promtool")
    m = busy_run() if started else RunMetrics()  # fresh: NaN where nothing was logged yet
    m.finish(0)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=m.exposition(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_promtool_flags_a_badly_named_metric() -> None:
    # The check above can fail: promtool does complain about a convention breach.
    from prometheus_client import Counter, generate_latest

    promtool = require_binary("promtool")
    registry = CollectorRegistry()
    Counter("qlora_train_milliseconds", "wrong unit", registry=registry).inc()
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(registry),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0


# --- serving --------------------------------------------------------------------------------


@pytest.mark.integration
def test_server_serves_the_registry_and_stops() -> None:
    m = busy_run()
    server = MetricsServer(m, 0, "127.0.0.1")
    assert server.start()
    try:
        body = http_get(f"http://127.0.0.1:{server.port}/metrics").decode()
        assert "qlora_train_step 7.0" in body
        m.set_progress(step=8, max_steps=100, epoch=0.08)
        assert (
            "qlora_train_step 8.0" in http_get(f"http://127.0.0.1:{server.port}/metrics").decode()
        )
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{server.port}/metrics", timeout_s=2)
    server.stop()  # idempotent


@pytest.mark.integration
def test_a_busy_port_is_logged_and_the_job_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(RunMetrics(), port, "127.0.0.1")
        with caplog.at_level(logging.WARNING, logger="runner.metrics"):
            assert server.start() is False
        assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
        server.stop()


# --- pushing --------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_push_replaces_the_jobs_group(pushgateway: Pushgateway) -> None:
    """One group per job and namespace: the last push of a job wins, other jobs stay apart."""
    m = busy_run()
    assert push_metrics(m, pushgateway.url, job="support-bot", namespace="team-a")
    m.finish(4)
    assert push_metrics(m, pushgateway.url, job="support-bot", namespace="team-a")
    group = {"job": "support-bot", "namespace": "team-a"}
    assert pushgateway.value("qlora_job_exit_code", **group) == 4
    assert pushgateway.value("qlora_job_phase", phase="failed", **group) == 1
    assert pushgateway.value("qlora_train_loss", **group) == 1.25
    elsewhere = RunMetrics()
    elsewhere.finish(0)
    assert push_metrics(elsewhere, pushgateway.url, job="support-bot", namespace="team-b")

    # The job's retry (a new run of the same job) succeeds: its push replaces the failure.
    retry = RunMetrics()
    retry.finish(0)
    assert push_metrics(retry, pushgateway.url, job="support-bot", namespace="team-a")
    assert pushgateway.value("qlora_job_exit_code", **group) == 0
    assert pushgateway.value("qlora_job_phase", phase="failed", **group) == 0
    assert pushgateway.value("qlora_train_loss", **group) != 1.25  # not the failed run's
    assert pushgateway.value("qlora_job_exit_code", job="support-bot", namespace="team-b") == 0
    keys = {(g.get("job"), g.get("namespace")) for g in pushgateway.groups()}
    assert {k for k in keys if k[0] == "support-bot"} == {
        ("support-bot", "team-a"),
        ("support-bot", "team-b"),
    }
    assert all("run" not in g for g in pushgateway.groups())


@pytest.mark.integration
def test_push_to_an_unreachable_gateway_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="runner.metrics"):
        assert push_metrics(busy_run(), url, job="j", namespace="n") is False
    assert "push to the Pushgateway" in caplog.text and url in caplog.text


@pytest.mark.integration
def test_push_to_a_gateway_that_never_answers_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="runner.metrics"):
            ok = push_metrics(busy_run(), url, job="j", namespace="n", timeout_s=1.0)
        elapsed = time.monotonic() - started
    assert ok is False
    assert elapsed < 5.0
    assert "failed" in caplog.text
