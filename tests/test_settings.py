"""A bad ``QLORA_*`` variable is a clear exit 2 from every command, never an internal error."""

from __future__ import annotations

import pytest

from runner.cli import main
from tests.conftest import REPO

SPEC = str(REPO / "examples" / "llama-3.1-8b.yaml")


@pytest.mark.parametrize(
    "argv",
    [["plan", SPEC], ["render", SPEC], ["run", "--spec", SPEC], ["verify", "file:///nowhere"]],
    ids=["plan", "render", "run", "verify"],
)
def test_invalid_setting_names_the_variable(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QLORA_STORAGE_RETRIES", "many")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid settings in the QLORA_* environment" in err
    assert "QLORA_STORAGE_RETRIES: must be a whole number in decimal digits" in err
    assert "internal error" not in err
