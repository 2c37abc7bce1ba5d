"""Job spec: good and bad documents, every error at once, secrets refused, fuzzing.

Fuzzing drives the real CLI entry point (`runner.cli.main`) with mutated documents and checks
the contract users rely on: exit 0 or 2, and on 2 only `path: message` lines, never a traceback.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import main
from runner.errors import ExitCode, SpecError
from runner.spec import (
    DEFAULT_TARGET_MODULES,
    json_schema,
    load_spec,
    load_spec_text,
    spec_hash,
    validate_document,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

GOOD: dict[str, Any] = {
    "apiVersion": "qlora-runner.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot"},
    "spec": {
        "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct@main"},
        "dataset": {"sources": ["s3://datasets/support/train.jsonl"], "format": "messages"},
        "output": {"uri": "s3://adapters/support-bot"},
    },
}
_SEG = r'(\.[A-Za-z_][\w-]*|\[\d+\]|\["(?:[^"\\]|\\.)*"\])'
LINE_RE = re.compile(rf"^(\(root\)|[A-Za-z_][\w-]*{_SEG}*|{_SEG}+): \S.*$")


def _doc(**patches: Any) -> dict[str, Any]:
    """GOOD with dotted-path patches applied; a value of ... deletes the key."""
    doc = copy.deepcopy(GOOD)
    for dotted, value in patches.items():
        *parents, leaf = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


def _errors(doc: object) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_document(doc)
    assert info.value.exit_code == ExitCode.INVALID_INPUT
    return list(info.value.details)


def test_minimal_spec_fills_defaults() -> None:
    spec = validate_document(GOOD)
    assert spec.spec.lora.target_modules == list(DEFAULT_TARGET_MODULES)
    assert spec.spec.lora.r == 16
    assert spec.spec.quantization.mode == "auto"
    assert spec.spec.training.micro_batch_size == "auto"
    assert spec.spec.model.trust_remote_code is False
    assert spec.spec.model.hf_repo == ("meta-llama/Llama-3.1-8B-Instruct", "main")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path: Path) -> None:
    assert load_spec(path).kind == "FineTuneJob"


def test_examples_exist() -> None:
    assert EXAMPLES, "examples/*.yaml must ship at least one spec"


BAD_CASES = [
    ("wrong-kind", _doc(kind="Job"), "kind: Input should be 'FineTuneJob'"),
    ("missing-output", _doc(spec__output=...), "spec.output: required field is missing"),
    ("name-uppercase", _doc(metadata__name="Bad_Name"), "metadata.name: String should match"),
    (
        "typo-with-hint",
        _doc(spec__training={"max_seq_lenght": 10}),
        "spec.training.max_seq_lenght: unknown field 'max_seq_lenght'; "
        "did you mean 'max_seq_length'?",
    ),
    ("negative-lr", _doc(spec__training={"learning_rate": -1}), "spec.training.learning_rate"),
    (
        "micro-batch-zero",
        _doc(spec__training={"micro_batch_size": 0}),
        "spec.training.micro_batch_size: input should be 'auto' or",
    ),
    (
        "text-needs-train-on-all",
        _doc(spec__dataset={"sources": ["d.jsonl"], "format": "text"}),
        "set train_on: all",
    ),
    ("bad-output-scheme", _doc(spec__output={"uri": "ftp://x/y"}), "use s3://bucket/prefix"),
    ("bad-bucket", _doc(spec__output={"uri": "s3://A_B/x"}), "not a valid bucket name"),
    ("traversal", _doc(spec__output={"uri": "s3://bucket/a/../b"}), "'..'"),
    ("bad-hf", _doc(spec__model={"source": "hf://nope"}), "hf://org/name"),
    ("bad-quant", _doc(spec__quantization={"mode": "8bit"}), "spec.quantization.mode"),
    ("bad-priority", _doc(spec__resources={"priority": "speed"}), "spec.resources.priority"),
    (
        "pushgateway-scheme",
        _doc(spec__metrics={"pushgateway_url": "gw:9091"}),
        "spec.metrics.pushgateway_url",
    ),
    ("root-not-mapping", ["a"], "(root): expected a mapping"),
]


@pytest.mark.parametrize(
    ("doc", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_spec_names_the_field_and_fix(doc: object, expected: str) -> None:
    lines = _errors(doc)
    assert any(expected in line for line in lines), lines
    assert all(LINE_RE.match(line) for line in lines), lines


def test_every_error_is_reported_at_once() -> None:
    doc = _doc(
        kind="Job",
        spec__lora={"r": 0, "alpha": 0},
        spec__training={"epochs": 0, "warmup_ratio": 2},
        spec__metrics={"port": 80},
    )
    lines = _errors(doc)
    for path in (
        "kind",
        "spec.lora.r",
        "spec.lora.alpha",
        "spec.training.epochs",
        "spec.training.warmup_ratio",
        "spec.metrics.port",
    ):
        assert any(line.startswith(f"{path}: ") for line in lines), (path, lines)


SECRETS = [
    ("aws-key-value", _doc(metadata__labels={"team": "AKIAABCDEFGHIJKLMNOP"}), "AWS access key"),
    (
        "url-credentials",
        _doc(spec__metrics={"pushgateway_url": "http://user:pw@gw:9091"}),
        "credentials in a URL",
    ),
    ("secret-key", _doc(spec__output={"uri": "s3://b/x", "secret_key": "x"}), "secret field"),
    (
        "hf-token",
        _doc(spec__dataset={"sources": ["hf_abcdefghijklmnopqrstuvwxyz0123456789"]}),
        "Hugging Face token",
    ),
    ("s3-userinfo", _doc(spec__output={"uri": "s3://key:secret@bucket/x"}), "credentials"),
]


@pytest.mark.parametrize(("doc", "what"), [c[1:] for c in SECRETS], ids=[c[0] for c in SECRETS])
def test_secret_looking_values_are_rejected(doc: dict[str, Any], what: str) -> None:
    lines = _errors(doc)
    assert any(what in line for line in lines), lines
    # The secret itself is never echoed back.
    assert not any("AKIAABCDEFGHIJKLMNOP" in line or ":pw@" in line for line in lines)


def test_spec_hash_is_stable_and_ignores_labels() -> None:
    a = validate_document(GOOD)
    b = validate_document(_doc(metadata__labels={"team": "x"}))
    c = validate_document(_doc(spec__lora={"r": 32}))
    assert spec_hash(a) == spec_hash(b)
    assert spec_hash(a) != spec_hash(c)
    assert re.fullmatch(r"[0-9a-f]{64}", spec_hash(a))


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text("apiVersion: [\n", source="job.yaml")
    assert re.match(r"job.yaml:\d+:\d+: not valid YAML", info.value.message)


def test_json_schema_covers_every_section() -> None:
    schema = json_schema()
    body = json.dumps(schema)
    for section in (
        "ModelSpec",
        "DatasetSpec",
        "LoraSpec",
        "QuantizationSpec",
        "TrainingSpec",
        "OutputSpec",
        "ResourcesSpec",
        "MetricsSpec",
    ):
        assert section in schema["$defs"], section
    assert "trust_remote_code" in body


def test_cli_validate_and_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_doc(spec__lora={"r": -1})))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.lora.r: Input should be greater than or equal to 1 (got -1)" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "JobSpec"


@pytest.mark.parametrize(
    ("argv", "how"),
    [
        (["plan"], "pass the spec file as the argument: qlora plan FILE"),
        (["render"], "pass the spec file as the argument: qlora render FILE"),
        (["submit"], "pass the spec file as the argument: qlora submit FILE"),
        (["validate"], "pass existing spec files: qlora validate FILE..."),
        (["run", "--spec"], "pass --spec FILE or set $QLORA_SPEC"),
    ],
    ids=["plan", "render", "submit", "validate", "run"],
)
def test_a_missing_spec_file_error_says_how_the_command_takes_its_spec(
    argv: list[str], how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main([*argv, str(missing)]) == ExitCode.INVALID_INPUT
    err = capsys.readouterr().err
    assert f"{missing}: no such file; {how}" in err
    if argv[0] != "run":  # only `qlora run` has a --spec option
        assert "--spec" not in err


def test_cli_subprocess_never_prints_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: qlora-runner.io/v1alpha1\nkind: FineTuneJob\nspec: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "spec: Input should be a valid dictionary" in proc.stderr
    assert "metadata: required field is missing" in proc.stderr


# --- fuzzing ---------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> object:
    doc = copy.deepcopy(GOOD)
    # Start from a fuller document so mutations hit every section.
    doc["spec"].update(
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj"]},
        quantization={"mode": "4bit"},
        training={"micro_batch_size": 2, "max_seq_length": 512},
        resources={"gpu_class": "24GB"},
        metrics={"port": 9400},
    )
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        node: Any = doc
        for p in path[:-1]:
            node = node[p]
        if not isinstance(node, dict):
            break
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(_values)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=12))] = draw(_values)
    return doc


def _check_cli_contract(text: str, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp / "fuzz.yaml"
    f.write_text(text, encoding="utf-8")
    code = main(["validate", str(f)])
    captured = capsys.readouterr()
    assert code in (ExitCode.OK, ExitCode.INVALID_INPUT), captured.err
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    if code == ExitCode.INVALID_INPUT:
        lines = captured.err.strip().splitlines()
        assert lines and lines[0].startswith("error: ")
        for line in lines[1:]:
            assert LINE_RE.match(line), line


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=_mutated())
def test_fuzz_mutated_documents(
    doc: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_cli_contract(json.dumps(doc, allow_nan=True), tmp_path, capsys)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_fuzz_arbitrary_text(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_cli_contract(text, tmp_path, capsys)
