"""Regressions from auditing every entry point as an attacker and a careless user would.

Each case was exit 1 ("internal error", retried by the Job), a lax coercion that widened what
runs, or a limit that could be switched off, before it was fixed; each is now exit 2 (exit 4
for a tampered published adapter) with a ``path: message`` line, in bounded time. All run in
process through :func:`runner.cli.main`, in milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from runner.cli import main
from runner.errors import SpecError
from runner.spec import load_spec_text
from tests.conftest import REPO

BASE_TEXT = (REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8")
LLAMA_SPEC = REPO / "examples" / "llama-3.1-8b.yaml"
DEEP_JSON = "[" * 100_000 + "]" * 100_000
BOMB = "a0: &a0 [x]\n" + "".join(
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)
)


def cli(argv: list[str]) -> tuple[int, str, float]:
    """``qlora ARGV`` in process: exit code, stderr, CPU seconds."""
    err = io.StringIO()
    started = time.process_time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue(), time.process_time() - started


def assert_user_error(rc: int, err: str, *fragments: str, code: int = 2) -> None:
    assert rc == code, err[-2000:]
    assert "internal error" not in err and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err[-2000:]}"


# -- the spec: YAML 1.2 scalars, and every number field strict -----------------------------


def _spec_error(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec_text(text, source="job.yaml")
    assert caught.value.exit_code == 2
    return caught.value.lines()


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("r: 16", "r: 1:20", "spec.lora.r: must be a whole number"),  # YAML 1.1 read 80
        ("r: 16", "r: 1_6", "spec.lora.r: must be a whole number"),  # YAML 1.1 read 16
        ("r: 16", "r: " + "9" * 5000, "an integer of 5000 digits"),  # was exit 1
        ("max_steps: 60", "max_steps: !!int 1.5", "!!int '1.5' is not an integer"),
        ("learning_rate: 0.02", 'learning_rate: "0.02"', "must be a number, unquoted"),
        ("learning_rate: 0.02", "learning_rate: !!float abc", "!!float 'abc' is not a number"),
        ("  model:\n", "  model:\n    trust_remote_code: !!bool yes\n", "!!bool 'yes'"),
        ("  model:\n", "  model:\n    trust_remote_code: !!bool on\n", "!!bool 'on'"),
        ("  output:\n", "  resources: {gpus_per_node: true}\n  output:\n", "gpus_per_node"),
        ("  output:\n", "  resources: {gpus_per_node: '2'}\n  output:\n", "gpus_per_node"),
        ("  output:\n", "  resources: {nodes: 2.0}\n  output:\n", "spec.resources.nodes"),
        ("  output:\n", "  resources: {deadline_hours: true}\n  output:\n", "deadline_hours"),
        ("  output:\n", "  resources: {deadline_hours: '5'}\n  output:\n", "deadline_hours"),
        ("max_steps: 60", "max_steps: 60\n    epochs: '3'", "spec.training.epochs: must be"),
    ],
    ids=[
        "sexagesimal", "underscore", "huge-int", "tagged-int", "quoted-real", "tagged-float",
        "tagged-bool-yes", "tagged-bool-on", "gpus-bool", "gpus-string", "nodes-float",
        "deadline-bool", "deadline-string", "epochs-string",
    ],
)
def test_lax_scalars_are_errors(old: str, new: str, fragment: str) -> None:
    assert old in BASE_TEXT
    lines = _spec_error(BASE_TEXT.replace(old, new, 1))
    assert any(fragment in line for line in lines), lines


def test_yaml_12_reads_what_yaml_11_misread() -> None:
    text = BASE_TEXT.replace("name: tiny-demo", "name: 2001-12-14").replace(
        "r: 16", "r: 0x10"
    ).replace("alpha: 32", "alpha: 032")
    spec = load_spec_text(text)
    assert spec.metadata.name == "2001-12-14"  # a string, not a date
    assert (spec.spec.lora.r, spec.spec.lora.alpha) == (16, 32)  # 032 is not octal
    assert load_spec_text(
        BASE_TEXT.replace("  model:\n", "  model:\n    trust_remote_code: !!bool true\n")
    ).spec.model.trust_remote_code is True


# -- plan --data and a local dataset: deep JSON was exit 1 -----------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_plan_data_nested_too_deeply_is_exit_2(tmp_path: Path, suffix: str) -> None:
    data = tmp_path / f"rows{suffix}"
    data.write_text(DEEP_JSON + "\n", encoding="utf-8")
    rc, err, took = cli(["plan", str(LLAMA_SPEC), "--data", str(data)])
    assert_user_error(rc, err, f"{data}", "not JSON")
    assert took < 1.0


def test_plan_data_rows_nested_deep_but_valid_are_counted(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    row = {"text": "hello " * 10}
    for _ in range(200):  # valid JSON, 400 levels deep: walked without recursion
        row = {"a": [row]}
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    rc, err, _ = cli(["plan", str(LLAMA_SPEC), "--data", str(data)])
    assert rc == 0, err[-2000:]


def test_plan_data_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    rc, err, _ = cli(["plan", str(LLAMA_SPEC), "--data", str(fifo)])
    assert_user_error(rc, err, f"{fifo}: not a regular file")


# -- qlora verify: a tampered manifest or pointer is exit 4, not exit 1 ----------------------


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("manifest.json", DEEP_JSON.encode(), "invalid manifest: not JSON"),
        ("manifest.json", b'{"format_version": ' + b"9" * 5000 + b"}", "invalid manifest"),
        ("latest.json", DEEP_JSON.encode(), "invalid pointer"),
        ("latest.json", b'{"run_id": 1' + b" " * 70_000 + b"}", "invalid pointer"),
    ],
    ids=["deep-manifest", "huge-int-manifest", "deep-latest", "huge-latest"],
)
def test_verify_a_tampered_document_is_exit_4(
    tmp_path: Path, name: str, data: bytes, fragment: str
) -> None:
    root = tmp_path / "out"
    where = root / "runs" / "r1" if name == "manifest.json" else root
    where.mkdir(parents=True)
    (where / name).write_bytes(data)
    rc, err, took = cli(["verify", f"file://{where}"])
    assert_user_error(rc, err, fragment, code=4)
    assert took < 1.0


# -- render's side files and the class table: bounded like a spec ----------------------------


def test_render_kueue_values_alias_bomb_is_exit_2_fast(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(BOMB + "kueue: {flavors: *a9}\n", encoding="utf-8")
    rc, err, took = cli(
        ["render", str(LLAMA_SPEC), "--queue", "q", "--kueue-flavors", str(values)]
    )
    assert_user_error(rc, err, f"{values}: invalid spec", "after expanding aliases")
    assert took < 1.0


@pytest.mark.parametrize(
    ("option", "content", "fragment"),
    [
        ("--model-config", DEEP_JSON, "nested too deeply"),
        ("--model-config", '{"model_type": "llama", "hidden_size": "4096"}', "hidden_size"),
        ("--plan", DEEP_JSON, "not a plan written by 'qlora plan --json'"),
    ],
    ids=["config-deep", "config-typed", "plan-deep"],
)
def test_render_side_files_are_checked(
    tmp_path: Path, option: str, content: str, fragment: str
) -> None:
    path = tmp_path / "side.json"
    path.write_text(content, encoding="utf-8")
    rc, err, took = cli(["render", str(LLAMA_SPEC), option, str(path)])
    assert_user_error(rc, err, fragment)
    assert took < 1.0


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (BOMB.encode(), "after expanding aliases"),
        ("classes: []\n".encode("utf-16"), "UTF-16 or UTF-32"),
        (b"classes: [\xff]\n", "not valid UTF-8 at byte"),
        (None, "not a regular file"),
    ],
    ids=["alias-bomb", "utf16", "bad-utf8", "fifo"],
)
def test_gpu_class_table_file_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | None, fragment: str
) -> None:
    table = tmp_path / "classes.yaml"
    if content is None:
        os.mkfifo(table)
    else:
        table.write_bytes(content)
    monkeypatch.setenv("QLORA_GPU_CLASSES_FILE", str(table))
    rc, err, took = cli(["plan", str(LLAMA_SPEC)])
    assert_user_error(rc, err, str(table), fragment)
    assert took < 1.0


# -- validate / plan on a model directory holding a FIFO or a directory ---------------------


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_model_file_that_is_not_a_file_is_named(
    tmp_path: Path, command: str, kind: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    if kind == "fifo":
        os.mkfifo(model / "config.json")
    else:
        (model / "config.json").mkdir()
    doc = yaml.safe_load(BASE_TEXT)
    doc["spec"]["model"]["source"] = str(model)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc), encoding="utf-8")
    rc, err, took = cli([command, str(spec)])
    assert_user_error(rc, err, f"{model / 'config.json'}: ")
    assert took < 1.0


@pytest.mark.parametrize("value", ["-3", "0", "1.5", "many"])
def test_eval_max_rows_must_be_positive(value: str) -> None:
    # A negative count used to slice rows off the end silently: rows[:-3].
    with pytest.raises(SystemExit) as caught, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["eval", "file:///nowhere", "--data", "x.jsonl", "--max-rows", value])
    assert caught.value.code == 2
    assert "--max-rows: must be a whole number of 1 or more" in err.getvalue()
