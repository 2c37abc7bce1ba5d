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
