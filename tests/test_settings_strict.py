"""``QLORA_*`` settings: booleans are exactly true/false, URLs are http(s) without credentials."""

from __future__ import annotations

import pytest
from pydantic import Field

from runner.errors import SpecError
from runner.settings import Settings, load_settings


class WithFlag(Settings):
    """Settings with a boolean, as a future flag would be declared."""

    allow_network: bool = Field(False)


@pytest.mark.parametrize("value", ["1", "yes", "on", "True", "t", "0", "no", ""])
def test_a_boolean_setting_accepts_only_true_or_false(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QLORA_ALLOW_NETWORK", value)
    with pytest.raises(ValueError, match="must be 'true' or 'false'"):
        WithFlag()


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_true_and_false(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_ALLOW_NETWORK", value)
    assert WithFlag().allow_network is expected


@pytest.mark.parametrize(
    "url",
    ["ftp://s3:21", "s3.storage:8333", "http://key:secret@s3:8333", "file:///etc", "http://"],
)
def test_url_settings_are_http_without_credentials(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("QLORA_S3_ENDPOINT_URL", "QLORA_PUSHGATEWAY_URL"):
        monkeypatch.setenv(var, url)
        with pytest.raises(SpecError) as e:
            load_settings()
        assert any(line.startswith(f"{var}: ") for line in e.value.details), e.value.details
        assert "key:secret" not in " ".join(e.value.lines())  # a credential is never echoed
        monkeypatch.delenv(var)


@pytest.mark.parametrize(
    "url", ["http://s3.storage.svc:8333", "https://s3.example/prefix", "http://[::1]:9000"]
)
def test_good_urls(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_S3_ENDPOINT_URL", url)
    assert load_settings().s3_endpoint_url == url


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("QLORA_STORAGE_RETRIES", "1.0", "must be a whole number in decimal digits"),
        ("QLORA_ATTEMPT", "1_0", "must be a whole number in decimal digits"),
        ("QLORA_ATTEMPT", " 1", "must be a whole number in decimal digits"),
        ("QLORA_MAX_NODES", "0x10", "must be a whole number in decimal digits"),
        ("QLORA_LOADING_BUDGET_S", "inf", "must be a finite decimal number"),
        ("QLORA_TRAINING_STALL_S", "1e999", "must be a finite decimal number"),
        ("QLORA_PREFLIGHT_BUDGET_S", "nan", "must be a finite decimal number"),
        ("QLORA_IMAGE_PULL_SECRETS", "registry-pull", "must be a JSON list of strings"),
        ("QLORA_OPERATOR_NAMESPACES", "[1, 2]", "must be a JSON list of strings"),
        ("QLORA_OPERATOR_NAMESPACES", "[" * 5000 + "]" * 5000, "must be a JSON list of strings"),
        ("QLORA_IMAGE_PULL_SECRETS", '["' + "a" * 70_000 + '"]', "the limit is 65536"),
    ],
    ids=["int-decimal", "int-underscore", "int-space", "int-hex", "inf", "overflow", "nan",
         "list-not-json", "list-of-ints", "list-deep", "list-huge"],
)
def test_lax_numbers_and_lists_are_exit_2_naming_the_variable(
    var: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget of inf would switch the watchdog off; a list that is not JSON used to be exit 1.
    monkeypatch.setenv(var, value)
    with pytest.raises(SpecError) as e:
        load_settings()
    assert any(
        line.startswith(f"{var}: ") and message in line for line in e.value.details
    ), e.value.details


def test_numbers_and_lists_in_their_real_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_ATTEMPT", "3")
    monkeypatch.setenv("QLORA_LOADING_BUDGET_S", "0.5")
    monkeypatch.setenv("QLORA_OPERATOR_NAMESPACES", '["team-a", "team-b"]')
    monkeypatch.setenv("QLORA_IMAGE_PULL_SECRETS", "")
    s = load_settings()
    assert (s.attempt, s.loading_budget_s) == (3, 0.5)
    assert s.operator_namespaces == ["team-a", "team-b"] and s.image_pull_secrets == []
