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

from tests.fixtures.tiny_model import need_train_extra
from tests.qlora_child import DATA, ChildResult, run_qlora_batch, tiny_job

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


LAX = ("yes", 1, "true", "on")
"""Spellings a careless spec might use for true; none is a boolean."""

Outcomes = dict[str, tuple[ChildResult, Path, Path]]


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    """Every run of this file in one batch child (``tests.qlora_child.run_qlora_batch``), each
    with its own planted model and marker. The literal-true run goes last, so the planted module
    is imported in that interpreter only after every other case has been judged by its own
    marker."""
    need_train_extra()
    root = tmp_path_factory.mktemp("remote-code")
    specs: dict[str, tuple[Path, Path]] = {}
    for name, fields in (
        ("untrusted", None),
        *((f"lax-{type(v).__name__}-{v}", {"trust_remote_code": v}) for v in LAX),
        ("literal-true", {"trust_remote_code": True}),
    ):
        tmp = root / name
        tmp.mkdir()
        model, marker = _planted(tiny_model_dir, tmp)
        data = _sharegpt_with_bom(tmp) if name == "untrusted" else DATA
        specs[name] = (tiny_job(tmp, model, data=data, model_fields=fields, steps=2), marker)
    results = run_qlora_batch(
        [(["run", "--spec", str(spec)], spec.parent / "work") for spec, _ in specs.values()]
    )
    return {
        name: (result, spec, marker)
        for (name, (spec, marker)), result in zip(specs.items(), results, strict=True)
    }


def test_planted_code_never_runs_without_trust(outcomes: Outcomes) -> None:
    result, _, marker = outcomes["untrusted"]
    assert result.rc == 0, result.stderr[-3000:]
    assert not marker.exists(), "the model's own code ran without trust_remote_code"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads(Path(summary["manifest_uri"].removeprefix("file://")).read_text())
    held = manifest["evaluation"]["held_out"]["rows"]  # carved before training for the gate
    assert manifest["dataset"]["train_rows"] + held == 64, "every ShareGPT row was read"
    assert manifest["dataset"]["preflight"]["loss_tokens"] > 0
    assert manifest["base_model"]["trust_remote_code"] is False


@pytest.mark.parametrize("value", LAX, ids=[f"{type(v).__name__}-{v}" for v in LAX])
def test_a_lax_spelling_never_turns_remote_code_on(outcomes: Outcomes, value: Any) -> None:
    result, _, marker = outcomes[f"lax-{type(value).__name__}-{value}"]
    assert not marker.exists(), f"trust_remote_code: {value!r} ran the model's code"
    result.assert_user_error("spec.model.trust_remote_code: must be true or false")


def test_literal_true_runs_the_planted_code(outcomes: Outcomes) -> None:
    result, _, marker = outcomes["literal-true"]
    assert marker.exists(), "the test cannot see remote code run"
    # The planted module defines no classes, so loading fails after it ran, as a user error.
    result.assert_user_error("spec.model.source")
    assert "model.trust_remote_code is true" in result.stderr  # the run's warning


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
