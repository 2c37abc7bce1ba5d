"""The commit protocol and publishing on a file:// store (fast, no server needed)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from runner.cli import main
from runner.errors import ExitCode, StorageError, VerificationError
from runner.publish import LATEST_NAME, new_run_id, publish_adapter, publish_to, verify_published
from runner.settings import Settings
from runner.storage import LocalStore, ObjectInfo, UnsafeKeyError
from runner.storage.commit import (
    MANIFEST_NAME,
    commit_directory,
    discard_committed,
    find_committed,
    read_committed,
    restore_directory,
)

METADATA = {"spec_hash": "ab" * 32, "base_model": {"id": "tiny-llama", "revision": "local"}}


def make_adapter(path: Path, seed: int = 0) -> Path:
    """A small adapter-like directory with a nested file."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(40_000))
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer.json").write_text("{}")
    return path


class FailingStore(LocalStore):
    """A real file:// store whose Nth put fails, as a storage outage mid-upload would."""

    def __init__(self, root: Path, fail_on: int) -> None:
        super().__init__(root)
        self.fail_on = fail_on
        self.puts: list[str] = []

    def put(self, key: str, source: Path | bytes) -> ObjectInfo:
        self.puts.append(key)
        if len(self.puts) == self.fail_on:
            raise StorageError(f"{self.uri(key)}: upload failed: injected outage")
        return super().put(key, source)


def test_commit_writes_manifest_last_and_reads_back(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    store = FailingStore(tmp_path / "store", fail_on=0)
    committed = commit_directory(store, "ckpt/step-10", adapter, {"step": 10})
    assert store.puts[-1] == "ckpt/step-10/manifest.json"
    assert sorted(store.puts[:-1]) == [
        "ckpt/step-10/adapter_config.json",
        "ckpt/step-10/adapter_model.safetensors",
        "ckpt/step-10/tokenizer/tokenizer.json",
    ]
    again = read_committed(store, "ckpt/step-10")
    assert again.manifest_sha256 == committed.manifest_sha256
    assert again.manifest["step"] == 10
    assert again.files == committed.files
    with pytest.raises(StorageError, match="already committed"):
        commit_directory(store, "ckpt/step-10", adapter, {})


def test_interrupted_commit_leaves_no_manifest_and_is_ignored(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    store = FailingStore(tmp_path / "store", fail_on=2)
    with pytest.raises(StorageError, match="injected outage"):
        commit_directory(store, "ckpt/step-20", adapter, {})
    assert store.head("ckpt/step-20/manifest.json") is None
    store.fail_on = 0
    commit_directory(store, "ckpt/step-10", adapter, {})
    assert find_committed(store, "ckpt") == ["ckpt/step-10"]
    with pytest.raises(VerificationError) as info:
        read_committed(store, "ckpt/step-20")
    assert any("manifest.json: missing" in line for line in info.value.details)


def test_restore_detects_corruption(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    store = LocalStore(tmp_path / "store")
    commit_directory(store, "ckpt/a", adapter, {})
    restored = restore_directory(store, "ckpt/a", tmp_path / "restored")
    assert (tmp_path / "restored" / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert len(restored.files) == 3
    target = tmp_path / "store" / "ckpt" / "a" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="cannot restore") as info:
        restore_directory(store, "ckpt/a", tmp_path / "again")
    assert info.value.details == (
        f"{store.uri('ckpt/a/adapter_model.safetensors')}: sha256 mismatch after download",
    )


def test_invalid_manifest_is_a_verification_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("run/manifest.json", b'{"format_version": 1, "files": [{"path": "../x"}]}')
    with pytest.raises(VerificationError) as info:
        read_committed(store, "run")
    assert "invalid manifest: files[0].path" in info.value.details[0]
    store.put("run/manifest.json", b"not json")
    with pytest.raises(VerificationError, match="verification failed"):
        read_committed(store, "run")


def test_publish_twice_keeps_runs_apart_and_latest_follows(tmp_path: Path) -> None:
    out = f"file://{tmp_path / 'out'}"
    first = publish_adapter(make_adapter(tmp_path / "a1", 1), out, METADATA, Settings())
    second = publish_adapter(make_adapter(tmp_path / "a2", 2), out, METADATA, Settings())
    assert first.run_id != second.run_id
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert runs == sorted([first.run_id, second.run_id])
    latest = json.loads((tmp_path / "out" / LATEST_NAME).read_text())
    assert latest["run_id"] == second.run_id
    assert latest["manifest_sha256"] == second.manifest_sha256
    report = verify_published(out, Settings())
    assert (report.run_id, report.via_latest) == (second.run_id, True)
    assert verify_published(first.run_uri, Settings()).run_id == first.run_id
    assert verify_published(first.manifest_uri, Settings()).run_id == first.run_id
    manifest = json.loads((tmp_path / "out" / "runs" / first.run_id / MANIFEST_NAME).read_bytes())
    assert manifest["base_model"] == METADATA["base_model"]
    assert manifest["run_id"] == first.run_id
    assert manifest["format_version"] == 1


def test_failed_publish_leaves_latest_on_the_previous_run(tmp_path: Path) -> None:
    good = publish_adapter(make_adapter(tmp_path / "a1"), f"file://{tmp_path}/out", {}, Settings())
    store = FailingStore(tmp_path / "out", fail_on=2)
    with pytest.raises(StorageError):
        publish_to(store, "", make_adapter(tmp_path / "a2"), METADATA, run_id="r2")
    assert not (tmp_path / "out" / "runs" / "r2" / MANIFEST_NAME).exists()
    assert verify_published(f"file://{tmp_path}/out", Settings()).run_id == good.run_id


def test_run_ids_are_unique_sortable_and_safe() -> None:
    ids = {new_run_id("cd" * 32) for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-cdcdcdcd-[0-9a-f]{6}", i) for i in ids)
    with pytest.raises(UnsafeKeyError, match="run id must match"):
        publish_to(LocalStore(Path("/nonexistent")), "", Path("."), {}, run_id="../evil")


def test_qlora_verify_cli_on_file_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = f"file://{tmp_path / 'out'}"
    result = publish_adapter(make_adapter(tmp_path / "a"), out, METADATA, Settings())
    assert main(["verify", out]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert f"verified {result.run_uri} (via latest.json)" in printed
    assert "3, 39.1 KiB" in printed
    run_dir = tmp_path / "out" / "runs" / result.run_id
    (run_dir / "tokenizer" / "tokenizer.json").unlink()
    assert main(["verify", out]) == ExitCode.VERIFICATION_FAILED
    err = capsys.readouterr().err
    assert f"{result.run_uri}/tokenizer/tokenizer.json: missing" in err
    assert "Traceback" not in err


def test_discard_removes_the_manifest_first(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    commit_directory(store, "ckpt/old", make_adapter(tmp_path / "a"), {})
    commit_directory(store, "ckpt/new", make_adapter(tmp_path / "b"), {})
    deleted: list[str] = []

    class Recording(LocalStore):
        def delete(self, key: str) -> None:
            deleted.append(key)
            super().delete(key)

    assert discard_committed(Recording(tmp_path), "ckpt/old") == 4
    assert deleted[0] == "ckpt/old/manifest.json"
    assert find_committed(store, "ckpt") == ["ckpt/new"]
    assert store.list("ckpt/old/") == []


def test_qlora_verify_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = publish_adapter(make_adapter(tmp_path / "a"), f"file://{tmp_path}/o", {}, Settings())
    (tmp_path / "o" / "runs" / result.run_id / "stray.tmp").write_text("left over")
    assert main(["verify", "--json", result.manifest_uri]) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["run_id"] == result.run_id
    assert report["via_latest"] is False
    assert [f["path"] for f in report["files"]] == [f.path for f in result.files]
    assert report["extra"] == [f"{result.run_uri}/stray.tmp"]
