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


def test_leader_election_timings_are_settings_with_client_gos_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runner.settings import Settings

    s = Settings()
    assert (s.operator_lease_duration_s, s.operator_renew_deadline_s,
            s.operator_retry_period_s) == (15.0, 10.0, 2.0)
    monkeypatch.setenv("QLORA_OPERATOR_LEASE_DURATION_S", "4")
    monkeypatch.setenv("QLORA_OPERATOR_RENEW_DEADLINE_S", "3")
    monkeypatch.setenv("QLORA_OPERATOR_RETRY_PERIOD_S", "1")
    fast = Settings()
    assert (fast.operator_lease_duration_s, fast.operator_renew_deadline_s) == (4.0, 3.0)
    # A renew deadline past the lease duration would let two leaders overlap: refused.
    monkeypatch.setenv("QLORA_OPERATOR_RENEW_DEADLINE_S", "5")
    assert main(["operator", "--once"]) == 2
    assert "QLORA_OPERATOR_LEASE_DURATION_S > QLORA_OPERATOR_RENEW_DEADLINE_S" in \
        capsys.readouterr().err
