"""Resolving 'auto' (plan.json or local defaults) and choosing the backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.errors import PlanError, SpecError
from runner.plan.types import GpuClass, Plan
from runner.recipe import _read_plan
from runner.spec import load_spec_text
from runner.spec.model import JobBody
from runner.train.backend import select_backend
from runner.train.resolve import CPU_MICRO_BATCH, resolve
from tests.fixtures.tiny_model import need_train_extra

BASE = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: t}
spec:
  model: {source: ./m}
  dataset: {sources: [d.jsonl]}
  output: {uri: file://out}
"""


def _body(**sections: dict[str, Any]) -> JobBody:
    spec = load_spec_text(BASE)
    body = spec.spec.model_dump(mode="json")
    for name, values in sections.items():
        body[name] = {**body[name], **values}
    return JobBody.model_validate(body)


def _plan(**kw: Any) -> Plan:
    fields: dict[str, Any] = {
        "spec_hash": "0" * 64,
        "gpu_class": GpuClass("24GB", 23000),
        "backend": "unsloth",
        "quant_mode": "16bit",
        "micro_batch_size": 3,
        "gradient_accumulation_steps": 5,
        "vram_terms": (),
        "vram_estimate_bytes": 1,
        "host_memory_bytes": 1,
        "cpu_cores": 4,
        "tokens_per_step": 1,
    }
    return Plan(**{**fields, **kw})


@pytest.mark.parametrize(
    ("sections", "cuda", "bf16", "expected"),
    [
        pytest.param({}, False, False, ("4bit", "float32", CPU_MICRO_BATCH, 4), id="cpu-defaults"),
        pytest.param({}, True, True, ("4bit", "bfloat16", 1, 16), id="gpu-no-plan"),
        pytest.param({}, True, False, ("4bit", "float16", 1, 16), id="gpu-no-bf16"),
        pytest.param(
            {"training": {"micro_batch_size": 2}, "quantization": {"mode": "16bit"}},
            False,
            False,
            ("16bit", "float32", 2, 8),
            id="explicit-micro-auto-accumulation",
        ),
        pytest.param(
            {
                "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 3},
                "quantization": {"compute_dtype": "bfloat16"},
            },
            False,
            False,
            ("4bit", "bfloat16", 2, 3),
            id="all-explicit",
        ),
    ],
)
def test_resolve_without_plan(
    sections: dict[str, Any], cuda: bool, bf16: bool, expected: tuple[str, str, int, int]
) -> None:
    r = resolve(_body(**sections), None, cuda=cuda, bf16=bf16)
    got = (
        r.precision.quant_mode,
        r.precision.compute_dtype,
        r.shape.micro_batch_size,
        r.shape.gradient_accumulation_steps,
    )
    assert got == expected
    if "auto" in str(sections) or not sections:
        assert r.reasons, "every auto decision is explained"


def test_plan_wins_over_local_defaults() -> None:
    r = resolve(_body(training={"micro_batch_size": 8}), _plan(), cuda=True, bf16=True)
    assert (r.precision.quant_mode, r.shape.micro_batch_size) == ("16bit", 3)
    assert r.shape.gradient_accumulation_steps == 5
    assert any("plan.json overrides training.micro_batch_size 8" in x for x in r.reasons)


def test_completion_only_follows_train_on() -> None:
    assert resolve(_body(), None, cuda=False, bf16=False).shape.completion_only_loss
    body = _body(dataset={"train_on": "all"})
    assert not resolve(body, None, cuda=False, bf16=False).shape.completion_only_loss


def test_plan_json_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    assert _read_plan(path) is None
    path.write_text(_plan().to_json())
    plan = _read_plan(path)
    assert plan is not None and plan.micro_batch_size == 3
    path.write_text('{"spec_hash": 1}')
    with pytest.raises(PlanError, match=r"plan\.json: not a valid plan"):
        _read_plan(path)


def test_forcing_unsloth_without_cuda_is_a_spec_error() -> None:
    need_train_extra()
    with pytest.raises(SpecError, match=r"spec.training.backend: 'unsloth' cannot run here"):
        select_backend("unsloth")


def test_auto_falls_back_to_transformers_on_cpu() -> None:
    need_train_extra()
    assert select_backend("auto").name == "transformers"
    assert select_backend("transformers").name == "transformers"


# --- the estimate of a run without a plan ---------------------------------------------------


def test_a_run_without_a_plan_gets_the_planners_estimate(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from runner.plan import estimate_run
    from runner.recipe import estimate_without_plan

    job = load_spec_text(BASE)
    with caplog.at_level("INFO", logger="runner.recipe"):
        found = estimate_without_plan(
            job, tiny_model_dir, quant_mode="4bit", backend="unsloth", micro_batch=4
        )
    config = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    expected = estimate_run(job, config, quant_mode="4bit", backend="unsloth", micro_batch=4)
    assert found == expected.total_bytes > 0
    assert "no plan.json" in caplog.text


def test_a_model_the_estimator_cannot_size_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from runner.recipe import estimate_without_plan

    job = load_spec_text(BASE)
    (tmp_path / "config.json").write_text('{"model_type": "not-a-known-architecture"}')
    with caplog.at_level("WARNING", logger="runner.recipe"):
        assert estimate_without_plan(
            job, tmp_path, quant_mode="4bit", backend="unsloth", micro_batch=1
        ) is None
        assert estimate_without_plan(
            job, tmp_path / "missing", quant_mode="4bit", backend="unsloth", micro_batch=1
        ) is None
    assert caplog.text.count("no VRAM estimate for this run") == 2


# --- a run by hand on a GPU plans for the card it finds -------------------------------------


def test_a_run_by_hand_on_a_gpu_plans_for_that_card(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import runner.train.backend as backend_module
    from runner.recipe import plan_this_card
    from runner.settings import Settings

    job = load_spec_text(BASE.replace("source: ./m", f"source: {tiny_model_dir}"))
    # What torch reports on the GPU host; this machine has no GPU to ask.
    monkeypatch.setattr(backend_module, "cuda_device", lambda: ("NVIDIA H200", 143_771 * 2**20))
    with caplog.at_level("INFO", logger="runner.recipe"):
        plan = plan_this_card(job, Settings(), "transformers")
    assert plan is not None
    assert plan.gpu_class.name == "this-card" and plan.backend == "transformers"
    assert "planned for this NVIDIA H200 (143771 MiB)" in caplog.text
    # The recipe resolves the run from it exactly as from a mounted plan.json.
    decided = resolve(job.spec, plan, cuda=True, bf16=True)
    assert decided.shape.micro_batch_size == plan.micro_batch_size
    assert any("class this-card" in r for r in decided.reasons)


def test_a_card_too_small_leaves_the_spec_values_and_warns(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import runner.train.backend as backend_module
    from runner.recipe import plan_this_card
    from runner.settings import Settings

    job = load_spec_text(BASE.replace("source: ./m", f"source: {tiny_model_dir}"))
    monkeypatch.setattr(backend_module, "cuda_device", lambda: ("a 1 MiB card", 2**20))
    with caplog.at_level("WARNING", logger="runner.recipe"):
        assert plan_this_card(job, Settings(), "unsloth") is None
    assert "no plan for this a 1 MiB card" in caplog.text
    assert "training with the spec's own values" in caplog.text
    monkeypatch.setattr(backend_module, "cuda_device", lambda: None)
    assert plan_this_card(job, Settings(), "unsloth") is None
