"""``qlora validate`` against what the model's config says: target modules and positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runner.cli import main
from runner.spec import load_spec_text
from runner.spec.model_checks import check_against_model
from tests.conftest import REPO

BASE = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))


def spec_file(tmp_path: Path, source: str, **lora_training: object) -> Path:
    doc = json.loads(json.dumps(BASE))
    doc["spec"]["model"]["source"] = source
    for key, value in lora_training.items():
        section = "lora" if key == "target_modules" else "training"
        doc["spec"][section][key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


# The shape fields every decoder-only config.json has (runner.plan.config_schema checks them).
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}


def model_dir(tmp_path: Path, **config: object) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", **SHAPE, **config}))
    return d


def validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_unknown_target_module_of_a_bundled_shape_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = spec_file(tmp_path, "hf://Qwen/Qwen2.5-0.5B", target_modules=["q_proj", "qkv_proj"])
    rc, _, err = validate(path, capsys)
    assert rc == 2
    assert "spec.lora.target_modules[1]: 'qkv_proj' is not a layer of a 'qwen2' model " in err
    assert "(bundled shape qwen2.5-0.5b)" in err and "gate_proj" in err


def test_dotted_names_and_all_seven_projections_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = [
        "model.layers.0.self_attn.q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    path = spec_file(
        tmp_path, str(model_dir(tmp_path, max_position_embeddings=128)), target_modules=modules
    )
    rc, out, err = validate(path, capsys)
    assert rc == 0, err
    assert "ok (tiny-demo" in out


def test_max_seq_length_beyond_positions_is_an_error_without_rope_scaling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = spec_file(
        tmp_path, str(model_dir(tmp_path, max_position_embeddings=32)), max_seq_length=64
    )
    rc, _, err = validate(path, capsys)
    assert rc == 2
    assert "spec.training.max_seq_length: 64 exceeds the model's max_position_embeddings 32" in err
    assert "set training.max_seq_length: 32 or less" in err


def test_max_seq_length_beyond_positions_is_a_warning_with_rope_scaling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_dir(
        tmp_path, max_position_embeddings=32, rope_scaling={"rope_type": "yarn", "factor": 4.0}
    )
    rc, _, err = validate(spec_file(tmp_path, str(model), max_seq_length=64), capsys)
    assert rc == 0, err
    assert "warning: spec.training.max_seq_length: 64 exceeds" in err and "yarn" in err


def test_a_wrongly_typed_position_count_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_dir(tmp_path, max_position_embeddings="4096")
    rc, _, err = validate(spec_file(tmp_path, str(model)), capsys)
    assert rc == 2 and "max_position_embeddings: must be an integer" in err


def test_a_broken_local_config_is_exit_2_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    rc, _, err = validate(spec_file(tmp_path, str(d)), capsys)
    assert rc == 2 and "config.json: not valid JSON" in err and "internal" not in err


def test_an_unknown_family_or_missing_config_is_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_spec_text(yaml.safe_dump(BASE))
    found = check_against_model(spec, {"model_type": "something-new"}, "x")
    assert found.errors == found.warnings == []
    rc, _, err = validate(spec_file(tmp_path, str(tmp_path / "absent")), capsys)
    assert rc == 0, err


def test_every_bundled_shape_knows_its_positions_and_modules() -> None:
    from runner.plan.model_config import bundled_shapes
    from runner.spec.model_checks import linear_modules

    for name, entry in bundled_shapes().items():
        cfg = entry["config"]
        text = cfg.get("text_config", cfg)
        assert isinstance(text.get("max_position_embeddings"), int), name
        assert text.get("model_type", cfg["model_type"]) in linear_modules(), name
