"""JobMetrics: configuration from spec and settings, and the open -> phases -> close lifecycle."""

from __future__ import annotations

import urllib.error

import pytest

from runner.job_metrics import JobMetrics
from runner.metrics import Phase
from runner.plan.types import GpuClass, Plan
from runner.settings import Settings
from runner.spec import JobSpec, validate_document
from runner.train.backend import BatchShape
from tests.fixtures.prometheus import Pushgateway, free_port, http_get

GIB = 1024**3


def make_spec(metrics: dict[str, object] | None = None) -> JobSpec:
    doc: dict[str, object] = {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support-bot"},
        "spec": {
            "model": {"source": "./model"},
            "dataset": {"sources": ["./data.jsonl"]},
            "output": {"uri": "file://./out"},
            "resources": {"gpu_class": "24GB"},
            **({"metrics": metrics} if metrics is not None else {}),
        },
    }
    return validate_document(doc)


@pytest.mark.parametrize(
    ("spec_url", "settings_url", "expected"),
    [
        ("http://spec-gw:9091", "http://settings-gw:9091", "http://spec-gw:9091"),
        (None, "http://settings-gw:9091", "http://settings-gw:9091"),
        (None, None, None),
    ],
    ids=["spec-wins", "settings-default", "none"],
)
def test_the_gateway_comes_from_the_spec_else_the_settings(
    spec_url: str | None, settings_url: str | None, expected: str | None
) -> None:
    metrics = {"enabled": False, **({"pushgateway_url": spec_url} if spec_url else {})}
    jm = JobMetrics(Settings(pushgateway_url=settings_url))
    jm.open(make_spec(metrics), "r1")
    assert jm.pushgateway_url == expected
    assert jm.server is None  # metrics.enabled: false serves nothing
    labels = {"backend": "auto", "gpu_class": "24GB", "quant_mode": "auto"}
    assert jm.metrics.value("qlora_job_info", job_name="support-bot", **labels) == 1


def test_describe_puts_the_plan_beside_the_measurement() -> None:
    jm = JobMetrics(Settings())
    jm.open(make_spec({"enabled": False}), "r1")
    plan = Plan(
        spec_hash="0" * 64,
        gpu_class=GpuClass("24GB", 23_000),
        backend="unsloth",
        quant_mode="4bit",
        micro_batch_size=4,
        gradient_accumulation_steps=4,
        vram_terms=(),
        vram_estimate_bytes=18 * GIB,
        host_memory_bytes=32 * GIB,
        cpu_cores=4,
        tokens_per_step=4 * 4 * 2048,
        usable_memory_bytes=21 * GIB,
    )
    shape = BatchShape(micro_batch_size=4, gradient_accumulation_steps=4, max_seq_length=2048)
    jm.describe(backend="unsloth", quant_mode="4bit", plan=plan, shape=shape)
    m = jm.metrics
    assert m.value("qlora_vram_estimate_bytes") == 18 * GIB
    assert m.value("qlora_vram_usable_bytes") == 21 * GIB
    assert m.value("qlora_train_micro_batch_size") == 4
    info = {"job_name": "support-bot", "backend": "unsloth", "gpu_class": "24GB"}
    assert m.value("qlora_job_info", quant_mode="4bit", **info) == 1
    assert m.value("qlora_job_info", quant_mode="auto", **info) is None  # replaced, not added


def test_final_phases_come_only_from_close() -> None:
    jm = JobMetrics(Settings())
    jm.set_phase("loading")
    jm.set_phase("failed")  # the recipe's hook reports it; close() decides with the exit code
    assert jm.metrics.current_phase is Phase.LOADING
    jm.close(0)
    assert jm.metrics.current_phase is Phase.SUCCEEDED


def test_a_run_that_never_loaded_its_spec_ends_failed_and_pushes_nothing() -> None:
    jm = JobMetrics(Settings(pushgateway_url=f"http://127.0.0.1:{free_port()}"))
    jm.set_phase("loading")
    jm.close(2)
    assert jm.pushed is None
    assert jm.metrics.value("qlora_job_phase", phase="failed") == 1
    assert jm.metrics.value("qlora_job_exit_code") == 2


@pytest.mark.integration
def test_open_serves_and_close_pushes_the_failure_then_stops(pushgateway: Pushgateway) -> None:
    port = free_port()
    jm = JobMetrics(Settings(metrics_bind_address="127.0.0.1"))
    jm.set_phase("loading")
    jm.open(make_spec({"port": port, "pushgateway_url": pushgateway.url}), "run-7")
    body = http_get(f"http://127.0.0.1:{port}/metrics").decode()
    assert 'qlora_job_phase{phase="loading"} 1.0' in body
    assert "qlora_job_start_timestamp_seconds" in body
    jm.set_phase("preflight")
    jm.close(2)
    assert jm.pushed is True
    group = {"job": "support-bot", "namespace": "qlora"}  # Settings' default namespace
    assert pushgateway.value("qlora_job_phase", phase="failed", **group) == 1
    assert pushgateway.value("qlora_job_phase", phase="preflight", **group) == 0
    assert pushgateway.value("qlora_job_exit_code", **group) == 2
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{port}/metrics", timeout_s=2)


def test_an_unknown_phase_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    jm = JobMetrics(Settings())
    jm.set_phase("loading")
    jm.set_phase("compiling")
    assert jm.metrics.current_phase is Phase.LOADING
    assert "unknown phase 'compiling'" in caplog.text
