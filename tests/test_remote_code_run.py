"""A model that ships Python code: it runs only when ``model.trust_remote_code`` is ``true``.

The tiny model gets a planted module named by ``auto_map`` in ``config.json`` and
``tokenizer_config.json``; importing it writes a marker file. A whole ``qlora run`` (tokenizer,
training, the verification reload) with the setting left out must train and publish without the
marker appearing; the lax spellings a careless spec might use must not turn it on; and with a
literal ``true`` the marker does appear, which shows the test can see the code run.

The run without the setting also reads ShareGPT data with a UTF-8 byte-order mark and no field
mapping, so one training run covers both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from runner.spec.model import ModelSpec
from tests.fixtures.tiny_model import need_train_extra
from tests.qlora_child import DATA, run_qlora, tiny_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _planted(tiny: Path, tmp: Path) -> tuple[Path, Path]:
    model = tmp / "model"
    shutil.copytree(tiny, model)
    marker = tmp / "remote-code-ran"
    # No classes: with the code trusted, loading fails right after the import (fast), and the
    # marker is already written.
    (model / "planted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n", encoding="utf-8"
    )
    for name, auto_map in (
        (
            "config.json",
            {"AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"},
        ),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "planted.Tokenizer"]}),
    ):
        doc = json.loads((model / name).read_text(encoding="utf-8"))
        doc["auto_map"] = auto_map
        (model / name).write_text(json.dumps(doc), encoding="utf-8")
    return model, marker


def _sharegpt_with_bom(tmp: Path) -> Path:
    out = tmp / "sharegpt.jsonl"
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["messages"]
        rows.append(
            json.dumps(
                {
                    "conversations": [
                        {"from": speaker[t["role"]], "value": t["content"]} for t in turns
                    ]
                }
            )
        )
    out.write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    return out


def test_planted_code_never_runs_without_trust(tiny_model_dir: Path, tmp_path: Path) -> None:
    need_train_extra()
    model, marker = _planted(tiny_model_dir, tmp_path)
    spec = tiny_job(tmp_path, model, data=_sharegpt_with_bom(tmp_path), steps=2)
    result = run_qlora(spec, tmp_path / "work")
    assert result.rc == 0, result.stderr[-3000:]
    assert not marker.exists(), "the model's own code ran without trust_remote_code"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads(Path(summary["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["dataset"]["train_rows"] == 64, "every ShareGPT row was read"
    assert manifest["dataset"]["preflight"]["loss_tokens"] > 0


def _is_strict_bool(value: Any) -> bool:
    try:
        ModelSpec.model_validate({"source": "/models/m", "trust_remote_code": value})
    except ValidationError as e:
        return any(err["loc"][-1] == "trust_remote_code" for err in e.errors())
    return False


LAX = [
    pytest.param(
        value,
        id=f"{type(value).__name__}-{value}",
        # The strict spec type is issue 11's spec half (branch sec-spec); until it is merged,
        # a lax value still coerces to true here, and this case is known to fail.
        marks=pytest.mark.xfail(
            not _is_strict_bool(value), reason="spec coerces lax booleans", strict=True
        ),
    )
    for value in ("yes", 1, "true", "on")
]


@pytest.mark.parametrize("value", LAX)
def test_a_lax_spelling_never_turns_remote_code_on(
    tiny_model_dir: Path, tmp_path: Path, value: Any
) -> None:
    need_train_extra()
    model, marker = _planted(tiny_model_dir, tmp_path)
    spec = tiny_job(tmp_path, model, model_fields={"trust_remote_code": value})
    result = run_qlora(spec, tmp_path / "work")
    assert not marker.exists(), f"trust_remote_code: {value!r} ran the model's code"
    result.assert_user_error("trust_remote_code")


def test_literal_true_runs_the_planted_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    need_train_extra()
    model, marker = _planted(tiny_model_dir, tmp_path)
    spec = tiny_job(tmp_path, model, model_fields={"trust_remote_code": True})
    result = run_qlora(spec, tmp_path / "work")
    assert marker.exists(), "the test cannot see remote code run"
    # The planted module defines no classes, so loading fails after it ran, as a user error.
    result.assert_user_error("spec.model.source")


def test_every_from_pretrained_passes_the_specs_setting() -> None:
    """Static check: each ``from_pretrained`` in the runner names ``trust_remote_code`` (the
    spec's value, or a literal False where no model code can apply), never leaves it to a
    default and never writes True."""
    import ast

    from tests.conftest import REPO

    calls = 0
    for path in sorted((REPO / "runner").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            kwargs_dicts = {
                target.id
                for node in ast.walk(func)
                if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Dict)
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)
                and any(
                    isinstance(k, ast.Constant) and k.value == "trust_remote_code"
                    for k in node.value.keys
                )
            }
            for call in ast.walk(func):
                if not (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "from_pretrained"
                ):
                    continue
                owner = ast.unparse(call.func.value)
                if owner == "PeftModel":  # loads adapter weights and config only, no model code
                    continue
                calls += 1
                where = f"{path.relative_to(REPO)}:{call.lineno} {owner}.from_pretrained"
                named = [k for k in call.keywords if k.arg == "trust_remote_code"]
                spread = [
                    k
                    for k in call.keywords
                    if k.arg is None
                    and isinstance(k.value, ast.Name)
                    and k.value.id in kwargs_dicts
                ]
                assert named or spread, f"{where} does not pass trust_remote_code"
                for k in named:  # a literal False is safe (GGUF conversion); True never is
                    is_true = isinstance(k.value, ast.Constant) and k.value.value is not False
                    assert not is_true, f"{where} turns remote code on by itself"
    assert calls >= 4, "the walk found the runner's loaders"
