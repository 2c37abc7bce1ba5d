"""Finding the base model: local directories and the offline Hugging Face cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from runner.errors import SpecError
from runner.spec.model import ModelSpec
from runner.train.model_files import resolve_model

COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
# The smallest config.json the runner accepts (runner.plan.config_schema checks every one).
CONFIG = (
    '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, '
    '"num_attention_heads": 4, "vocab_size": 300}'
)


def _no_fetch(uri: str, sub: Path) -> Path:
    raise AssertionError(f"nothing should be downloaded for {uri}")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--meta-llama--Llama-3.1-8B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(CONFIG)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snap


@pytest.mark.parametrize("revision", ["", "@main", f"@{COMMIT[:7]}", f"@{COMMIT}"])
def test_hf_source_resolves_from_the_local_cache(hf_cache: Path, revision: str) -> None:
    base = resolve_model(ModelSpec(source=f"hf://meta-llama/Llama-3.1-8B{revision}"), _no_fetch)
    assert base.path == hf_cache
    assert (base.model_id, base.revision) == ("meta-llama/Llama-3.1-8B", COMMIT)
    expected = hashlib.sha256(CONFIG.encode()).hexdigest()
    assert base.config_sha256 == expected
    assert base.manifest_entry()["revision"] == COMMIT


def test_hf_source_missing_from_the_cache_never_downloads(hf_cache: Path) -> None:
    with pytest.raises(SpecError, match=r"hf://meta-llama/Other@main is not in the local"):
        resolve_model(ModelSpec(source="hf://meta-llama/Other"), _no_fetch)


def test_local_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(
        SpecError, match=r"^spec.model.source: .*no config.json in .*runner.train.tiny"
    ):
        resolve_model(ModelSpec(source=str(tmp_path)), _no_fetch)


def test_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(CONFIG)
    base = resolve_model(ModelSpec(source=str(tmp_path)), _no_fetch)
    assert (base.path, base.model_id, base.revision) == (tmp_path, tmp_path.name, None)


def test_s3_source_is_fetched_into_the_work_dir(tmp_path: Path) -> None:
    seen: list[tuple[str, Path]] = []

    def fetch(uri: str, sub: Path) -> Path:
        seen.append((uri, sub))
        (tmp_path / "config.json").write_text(CONFIG)
        return tmp_path

    base = resolve_model(ModelSpec(source="s3://models/llama-8b"), fetch)
    assert seen == [("s3://models/llama-8b", Path("model"))]
    assert (base.path, base.model_id) == (tmp_path, "llama-8b")
