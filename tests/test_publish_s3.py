"""Publishing to a real S3-compatible server (SeaweedFS) and ``qlora verify`` against it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runner.cli import main
from runner.errors import ExitCode, StorageError, VerificationError
from runner.publish import publish_adapter, publish_to, verify_published
from runner.storage import ObjectInfo
from runner.storage.s3 import S3Store
from tests.fixtures.s3 import S3Bucket, SeaweedServer

pytestmark = pytest.mark.integration


METADATA = {
    "spec_hash": "5e" * 32,
    "base_model": {"id": "tiny-llama", "revision": "local", "config_sha256": "c0" * 32},
    "dataset": {"fingerprint": "d4" * 32, "rows": 64},
    "verification": {"changed_modules": 14, "logits_max_abs_diff": 0.12},
    "training": {"steps": 10, "loss_first": 5.5, "loss_last": 4.8},
    "versions": {"qlora-runner": "0.1.0", "peft": "0.21.2"},
}


def make_adapter(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(60_000))
    (path / "README.md").write_text("tiny adapter\n")
    return path


class RecordingStore(S3Store):
    """The real S3 store, recording the order of writes and optionally failing or corrupting."""

    def __init__(self, *args: object, fail_on: int = 0, corrupt: str = "", **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.fail_on = fail_on
        self.corrupt = corrupt
        self.puts: list[str] = []

    def put(self, key: str, source: Path | bytes) -> ObjectInfo:
        self.puts.append(key)
        if len(self.puts) == self.fail_on:
            raise StorageError(f"{self.uri(key)}: upload failed: injected outage")
        if self.corrupt and key.endswith(self.corrupt):
            # Bytes changed on the way, same length: only a read-back re-hash notices.
            data = bytearray(source.read_bytes() if isinstance(source, Path) else source)
            data[0] ^= 0xFF
            source = bytes(data)
        return super().put(key, source)


def test_publish_round_trip_and_verify(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    out = s3_bucket.uri_for("adapters/support-bot")
    result = publish_adapter(adapter, out, METADATA, s3_bucket.server.settings())
    run = f"adapters/support-bot/runs/{result.run_id}"
    assert result.run_uri == s3_bucket.uri_for(run)
    assert s3_bucket.keys() == sorted(
        [
            f"{run}/README.md",
            f"{run}/adapter_config.json",
            f"{run}/adapter_model.safetensors",
            f"{run}/manifest.json",
            "adapters/support-bot/latest.json",
        ]
    )
    manifest = json.loads(s3_bucket.get(f"{run}/manifest.json"))
    for key, value in METADATA.items():
        assert manifest[key] == value
    assert manifest["run_id"] == result.run_id and manifest["format_version"] == 1
    assert manifest["created"].endswith("Z")
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["adapter_model.safetensors"]["size"] == 60_000
    assert (
        s3_bucket.get(f"{run}/adapter_model.safetensors")
        == (adapter / "adapter_model.safetensors").read_bytes()
    )
    latest = json.loads(s3_bucket.get("adapters/support-bot/latest.json"))
    assert latest["run_id"] == result.run_id
    assert latest["manifest_sha256"] == result.manifest_sha256

    assert main(["verify", out]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert f"verified {result.run_uri} (via latest.json)" in printed
    assert "files:    3," in printed


def test_manifest_is_written_last_and_latest_after_it(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = RecordingStore(s3_bucket.name, s3_bucket.server.settings())
    result = publish_to(store, "out", make_adapter(tmp_path / "a"), METADATA)
    run = f"out/runs/{result.run_id}"
    assert store.puts[-2:] == [f"{run}/manifest.json", "out/latest.json"]
    assert len(store.puts) == 5


def test_upload_failing_midway_commits_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    settings = s3_bucket.server.settings()
    out = s3_bucket.uri_for("out")
    first = publish_adapter(make_adapter(tmp_path / "a1"), out, METADATA, settings)
    latest_before = s3_bucket.get("out/latest.json")
    store = RecordingStore(s3_bucket.name, settings, fail_on=2)
    with pytest.raises(StorageError, match="injected outage"):
        publish_to(store, "out", make_adapter(tmp_path / "a2"), METADATA, run_id="second")
    assert [k for k in s3_bucket.keys("out/runs/second/") if k.endswith("manifest.json")] == []
    assert s3_bucket.get("out/latest.json") == latest_before
    assert verify_published(out, settings).run_id == first.run_id
    with pytest.raises(VerificationError, match="nothing published here"):
        verify_published(s3_bucket.uri_for("out/runs/second"), settings)


def test_readback_rehash_catches_corruption_in_transit(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = RecordingStore(
        s3_bucket.name, s3_bucket.server.settings(), corrupt="adapter_model.safetensors"
    )
    with pytest.raises(VerificationError, match="upload corrupted; no manifest written") as info:
        publish_to(store, "out", make_adapter(tmp_path / "a"), METADATA, run_id="r1")
    assert info.value.details == (
        s3_bucket.uri_for("out/runs/r1/adapter_model.safetensors")
        + ": read back differs from the local file",
    )
    assert not [k for k in s3_bucket.keys("") if k.endswith(("manifest.json", "latest.json"))]


def test_two_publishes_two_prefixes_latest_is_second(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    settings = s3_bucket.server.settings()
    out = s3_bucket.uri_for("out")
    first = publish_adapter(make_adapter(tmp_path / "a1", 1), out, METADATA, settings)
    second = publish_adapter(make_adapter(tmp_path / "a2", 2), out, METADATA, settings)
    assert first.run_id != second.run_id
    runs = {k.split("/")[2] for k in s3_bucket.keys("out/runs/")}
    assert runs == {first.run_id, second.run_id}
    for run in (first, second):
        files = s3_bucket.keys(f"out/runs/{run.run_id}/")
        assert len(files) == 4  # three files and the manifest, never mixed
    assert verify_published(out, settings).run_id == second.run_id
    assert verify_published(first.run_uri, settings).run_id == first.run_id
    assert verify_published(first.manifest_uri, settings).run_id == first.run_id


def _published(s3_bucket: S3Bucket, tmp_path: Path) -> tuple[str, str]:
    result = publish_adapter(
        make_adapter(tmp_path / "adapter"),
        s3_bucket.uri_for("out"),
        METADATA,
        s3_bucket.server.settings(),
    )
    return s3_bucket.uri_for("out"), f"out/runs/{result.run_id}"


def test_verify_fails_on_deleted_object(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = _published(s3_bucket, tmp_path)
    s3_bucket.delete(f"{run}/adapter_config.json")
    assert main(["verify", out]) == ExitCode.VERIFICATION_FAILED
    err = capsys.readouterr().err
    assert f"{s3_bucket.uri_for(run)}/adapter_config.json: missing" in err
    assert "Traceback" not in err


def test_verify_fails_on_corrupted_object_of_the_same_size(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = _published(s3_bucket, tmp_path)
    key = f"{run}/adapter_model.safetensors"
    data = bytearray(s3_bucket.get(key))
    data[1234] ^= 0x01
    s3_bucket.put(key, bytes(data))
    assert main(["verify", s3_bucket.uri_for(run)]) == ExitCode.VERIFICATION_FAILED
    err = capsys.readouterr().err
    assert f"{s3_bucket.uri_for(key)}: sha256 mismatch" in err


def test_verify_fails_on_missing_manifest(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = _published(s3_bucket, tmp_path)
    s3_bucket.delete(f"{run}/manifest.json")
    assert main(["verify", out]) == ExitCode.VERIFICATION_FAILED
    assert f"{s3_bucket.uri_for(run)}/manifest.json: missing" in capsys.readouterr().err
    assert main(["verify", s3_bucket.uri_for(run)]) == ExitCode.VERIFICATION_FAILED
    assert "nothing published here" in capsys.readouterr().err


def test_verify_catches_a_swapped_manifest_and_a_hostile_pointer(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = _published(s3_bucket, tmp_path)
    manifest = json.loads(s3_bucket.get(f"{run}/manifest.json"))
    manifest["training"]["steps"] = 999
    s3_bucket.put(f"{run}/manifest.json", json.dumps(manifest).encode())
    assert main(["verify", out]) == ExitCode.VERIFICATION_FAILED
    assert "sha256 differs from the one pinned" in capsys.readouterr().err
    s3_bucket.put(
        "out/latest.json",
        json.dumps(
            {"run_id": "x", "manifest": "../../etc/manifest.json", "manifest_sha256": "0" * 64}
        ).encode(),
    )
    assert main(["verify", out]) == ExitCode.VERIFICATION_FAILED
    assert "invalid pointer" in capsys.readouterr().err


def test_storage_outage_exit_5_then_a_rerun_publishes(
    private_s3_server: SeaweedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    private_s3_server.apply_env(monkeypatch)
    bucket = private_s3_server.create_bucket()
    out = f"s3://{bucket}/out"
    adapter = make_adapter(tmp_path / "adapter")
    settings = private_s3_server.settings(storage_retries=2)
    private_s3_server.kill()  # a crash: no graceful shutdown
    start = time.monotonic()
    unreachable = r"\(after 2 retries\): cannot reach the S3 endpoint"
    with pytest.raises(StorageError, match=unreachable) as e:
        publish_adapter(adapter, out, METADATA, settings)
    assert e.value.exit_code == ExitCode.STORAGE
    assert time.monotonic() - start < 20
    private_s3_server.start()
    bucket_keys = S3Bucket(private_s3_server, bucket, private_s3_server.client()).keys
    assert [k for k in bucket_keys() if k.endswith(("manifest.json", "latest.json"))] == []
    result = publish_adapter(adapter, out, METADATA, settings)
    assert main(["verify", out]) == ExitCode.OK
    assert result.run_id in capsys.readouterr().out
