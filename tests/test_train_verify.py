"""The weight-update check on real LoRA tensors of the tiny model (no training needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from runner.errors import VerificationError
from runner.spec.model import DEFAULT_TARGET_MODULES, LoraSpec
from runner.train.backend import Precision
from runner.train.verify import check_weight_update, snapshot_lora, tensor_sha256


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir: Path) -> Any:
    from runner.train.transformers_backend import TransformersBackend

    session = TransformersBackend().load(
        tiny_model_dir, Precision("16bit", "float32"), LoraSpec(r=4), seed=0, max_seq_length=32
    )
    return session.model


def _perturb(model: Any, skip: str | None = None, value: float | None = None) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and (skip is None or skip not in name):
                if value is None:
                    p.add_(0.01)
                else:
                    p.fill_(value)


def test_hash_is_of_the_raw_bytes() -> None:
    import torch

    a = torch.zeros(4, dtype=torch.float32)
    assert tensor_sha256(a) == tensor_sha256(torch.zeros(4))
    assert tensor_sha256(a) != tensor_sha256(torch.zeros(4, dtype=torch.bfloat16))
    assert tensor_sha256(a) != tensor_sha256(torch.tensor([0.0, 0.0, 0.0, 1e-30]))


def test_every_tensor_changed_passes_and_reports(lora_model: Any) -> None:
    before = snapshot_lora(lora_model)
    _perturb(lora_model)
    report = check_weight_update(before, snapshot_lora(lora_model), DEFAULT_TARGET_MODULES)
    assert report["tensors"] == 2 * 7 * 2  # 2 layers x 7 modules x (A, B)
    assert report["changed_tensors"] == report["tensors"]
    assert report["min_max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    row = report["per_tensor"][0]
    assert row["sha256_before"] != row["sha256_after"] and row["finite"]


def test_one_unchanged_module_fails_naming_it(lora_model: Any) -> None:
    _perturb(lora_model)  # B no longer zero
    before = snapshot_lora(lora_model)
    _perturb(lora_model, skip="layers.1.self_attn.v_proj")
    with pytest.raises(VerificationError) as e:
        check_weight_update(before, snapshot_lora(lora_model), DEFAULT_TARGET_MODULES)
    assert e.value.exit_code == 4
    assert e.value.details == (
        "base_model.model.model.layers.1.self_attn.v_proj: adapter unchanged by training",
    )


def test_nothing_changed_fails_for_every_module(lora_model: Any) -> None:
    snap = snapshot_lora(lora_model)
    with pytest.raises(VerificationError, match="failed for 14 adapter module"):
        check_weight_update(snap, snap, DEFAULT_TARGET_MODULES)


def test_non_finite_and_zero_b_fail(lora_model: Any) -> None:
    before = snapshot_lora(lora_model)
    _perturb(lora_model, value=math.nan)
    with pytest.raises(VerificationError) as e:
        check_weight_update(before, snapshot_lora(lora_model), DEFAULT_TARGET_MODULES)
    assert any("holds NaN or Inf" in d for d in e.value.details)
    _perturb(lora_model, value=0.0)
    with pytest.raises(VerificationError) as e:
        check_weight_update(before, snapshot_lora(lora_model), DEFAULT_TARGET_MODULES)
    assert any("lora_B is all zeros" in d for d in e.value.details)


def test_a_targeted_module_without_adapter_fails(lora_model: Any) -> None:
    before = snapshot_lora(lora_model)
    _perturb(lora_model, value=0.5)
    with pytest.raises(VerificationError) as e:
        check_weight_update(before, snapshot_lora(lora_model), [*DEFAULT_TARGET_MODULES, "w9"])
    assert e.value.details == ("w9: targeted but has no LoRA adapter",)


def _examples() -> list[Any]:
    from runner.train.backend import TokenizedExample

    return [TokenizedExample(tuple(range(5, 25)), (0,) * 10 + (1,) * 10) for _ in range(2)]


def _reload(tiny_model_dir: Path, adapter_dir: Path) -> Any:
    from runner.train.transformers_backend import TransformersBackend

    return TransformersBackend().load_for_verification(
        tiny_model_dir, adapter_dir, Precision("4bit", "float32")
    )


@pytest.fixture
def saved_adapter(tiny_model_dir: Path, tmp_path: Path) -> tuple[Any, Path]:
    """A 4-bit session with LoRA B set to non-zero values, saved to disk."""
    from runner.train.transformers_backend import TransformersBackend

    backend = TransformersBackend()
    session = backend.load(
        tiny_model_dir, Precision("4bit", "float32"), LoraSpec(r=4), seed=0, max_seq_length=32
    )
    return session, tmp_path / "adapter"


def test_reloaded_adapter_passes_and_reports_the_statistic(
    tiny_model_dir: Path, saved_adapter: tuple[Any, Path]
) -> None:
    from runner.train.transformers_backend import TransformersBackend
    from runner.train.verify import MIN_LOGIT_DIFF, check_reloaded

    session, adapter_dir = saved_adapter
    _perturb(session.model, value=0.05)
    TransformersBackend().save_adapter(session, adapter_dir)
    report = check_reloaded(_reload(tiny_model_dir, adapter_dir), adapter_dir, _examples())
    assert report["tensors"] == 28 and report["tensors_hash_equal"]
    assert report["max_abs_logit_diff"] > MIN_LOGIT_DIFF == report["threshold"]
    assert report["batch_tokens"] == 40


def test_adapter_without_effect_fails_the_logit_check(
    tiny_model_dir: Path, saved_adapter: tuple[Any, Path]
) -> None:
    from runner.train.transformers_backend import TransformersBackend
    from runner.train.verify import check_reloaded

    session, adapter_dir = saved_adapter  # fresh LoRA: B == 0, so logits equal the base's
    TransformersBackend().save_adapter(session, adapter_dir)
    with pytest.raises(
        VerificationError,
        match=r"changes the logits by at most 0, not more than 0.01; the adapter has no effect",
    ):
        check_reloaded(_reload(tiny_model_dir, adapter_dir), adapter_dir, _examples())


def test_saved_file_differing_from_the_reloaded_adapter_fails(
    tiny_model_dir: Path, saved_adapter: tuple[Any, Path]
) -> None:
    from safetensors.torch import load_file, save_file

    from runner.train.transformers_backend import TransformersBackend
    from runner.train.verify import check_reloaded

    session, adapter_dir = saved_adapter
    _perturb(session.model, value=0.05)
    TransformersBackend().save_adapter(session, adapter_dir)
    reloaded = _reload(tiny_model_dir, adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, str(path))
    with pytest.raises(VerificationError) as e:
        check_reloaded(reloaded, adapter_dir, _examples())
    assert e.value.details == (f"{first}: reloaded tensor differs from adapter_model.safetensors",)
