"""The fault-injection setting QLORA_FAULT_OOM_AT_STEP (runner.train.faults): off by default,
inherited by rendered pods, fires in attempt 0 only, at the end of the named step, as the
error class a real CUDA out-of-memory raises (so the run exits 6). The whole path on a real
cluster: tests/test_cluster_e2e.py::test_an_out_of_memory_exit_replans_and_the_new_job_resumes.
"""

from __future__ import annotations

import time
import types
from typing import Any

import pytest

from runner.errors import ExitCode, OutOfMemoryError
from runner.k8s.manifests import render_objects
from runner.settings import Settings
from runner.spec import load_spec_text
from runner.train.faults import make_fault_callbacks
from runner.train.oom import cuda_oom_as_error
from tests.test_manifests_render import SPEC, make_plan

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _env(settings: Settings) -> dict[str, Any]:
    job = render_objects(load_spec_text(SPEC), make_plan(), settings)[-1]
    return {e["name"]: e.get("value") for e in
            job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_rendered_pods_inherit_the_setting_only_when_it_is_set() -> None:
    assert "QLORA_FAULT_OOM_AT_STEP" not in _env(Settings())
    assert _env(Settings(fault_oom_at_step=5))["QLORA_FAULT_OOM_AT_STEP"] == "5"


def test_off_by_default_and_in_later_attempts() -> None:
    assert make_fault_callbacks(Settings()) == []
    assert make_fault_callbacks(Settings(fault_oom_at_step=3, attempt=1)) == []


def test_fires_at_the_end_of_that_step_as_a_cuda_oom() -> None:
    (cb,) = make_fault_callbacks(Settings(fault_oom_at_step=3, attempt=0))
    for step in (1, 2, 4):
        cb.on_step_end(None, types.SimpleNamespace(global_step=step), None)
    with pytest.raises(OutOfMemoryError) as info, cuda_oom_as_error("training"):
        cb.on_step_end(None, types.SimpleNamespace(global_step=3), None)
    assert info.value.exit_code == ExitCode.CUDA_OOM
    assert "QLORA_FAULT_OOM_AT_STEP=3" in str(info.value)


def test_the_step_delay_is_off_by_default_inherited_and_sleeps_after_each_step() -> None:
    assert "QLORA_FAULT_STEP_DELAY_S" not in _env(Settings())
    assert _env(Settings(fault_step_delay_s=0.5))["QLORA_FAULT_STEP_DELAY_S"] == "0.5"
    (cb,) = make_fault_callbacks(Settings(fault_step_delay_s=0.2, attempt=1))
    start = time.monotonic()
    cb.on_step_end(None, types.SimpleNamespace(global_step=1), None)
    assert time.monotonic() - start >= 0.2
