"""The shipped CPU examples pass the preflight, and ``qlora run`` fails cleanly without a spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner import cli
from runner.spec import load_spec
from runner.train.dataset import load_rows
from runner.train.formatting import format_rows, resolve_chat_template
from runner.train.preflight import MIN_LOSS_TOKEN_FRACTION, preflight
from tests.conftest import REPO

TINY_EXAMPLES = sorted((REPO / "examples").glob("tiny-cpu*.yaml"))


@pytest.mark.parametrize("path", TINY_EXAMPLES, ids=lambda p: p.stem)
def test_tiny_examples_pass_preflight(
    path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # example paths are relative to the repository root
    body = load_spec(path).spec
    data = load_rows(body.dataset, None, seed=body.training.seed)
    rows = format_rows(
        data.train,
        body.dataset,
        tiny_tokenizer,
        resolve_chat_template(body.dataset, tiny_tokenizer),
    )
    _, report = preflight(rows, tiny_tokenizer, body.training.max_seq_length)
    assert report.rows == len(data.train) >= 48
    assert report.truncated_rows == 0 and report.dropped_rows == 0
    assert report.loss_token_fraction > MIN_LOSS_TOKEN_FRACTION
    assert body.output.uri.startswith("file://.qlora-store/")


def test_tiny_examples_exist() -> None:
    assert {p.name for p in TINY_EXAMPLES} >= {"tiny-cpu.yaml", "tiny-cpu-alpaca.yaml"}


def test_run_without_a_spec_names_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QLORA_SPEC", raising=False)
    monkeypatch.chdir(tmp_path)
    if Path("/etc/qlora/job.yaml").exists():
        pytest.skip("this machine has a mounted job spec")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "/etc/qlora/job.yaml: no such file; pass --spec FILE or set $QLORA_SPEC" in err


def test_run_with_qlora_spec_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QLORA_SPEC", str(tmp_path / "job.yaml"))
    assert cli.main(["run"]) == 2
    assert f"{tmp_path / 'job.yaml'}: no such file" in capsys.readouterr().err
