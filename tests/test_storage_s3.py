"""The S3 store against a real SeaweedFS server: round trips, multipart, fetch, and failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cli import main
from runner.errors import ExitCode, StorageError
from runner.storage import ObjectNotFoundError, UnsafeKeyError, fetch, open_store
from runner.storage.s3 import RetryPolicy, S3Store
from tests.fixtures.s3 import S3Bucket, SeaweedServer

pytestmark = pytest.mark.integration


def test_round_trip(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store, prefix = open_store(s3_bucket.uri_for("out"), s3_bucket.server.settings())
    assert prefix == "out"
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(200_000))
    info = store.put("out/a/w.bin", src)
    assert info.size == 200_000
    store.put("out/a/c.json", b"{}")
    store.put("out/ab", b"x")
    assert s3_bucket.get("out/a/w.bin") == src.read_bytes()
    assert store.read("out/a/c.json") == b"{}"
    assert [o.key for o in store.list("out/a/")] == ["out/a/c.json", "out/a/w.bin"]
    assert [o.key for o in store.list("out/a")] == ["out/a/c.json", "out/a/w.bin", "out/ab"]
    head = store.head("out/a/w.bin")
    assert head is not None and head.size == 200_000 and head.etag
    assert store.head("out/a/none") is None
    store.download("out/a/w.bin", tmp_path / "dl" / "w.bin")
    assert (tmp_path / "dl" / "w.bin").read_bytes() == src.read_bytes()
    store.delete("out/a/w.bin")
    assert store.head("out/a/w.bin") is None
    with pytest.raises(ObjectNotFoundError, match=rf"s3://{s3_bucket.name}/out/a/w.bin: no such"):
        store.read("out/a/w.bin")
    with pytest.raises(ObjectNotFoundError):
        store.download("out/a/w.bin", tmp_path / "dl" / "again")
    assert not list((tmp_path / "dl").glob(".qlora-tmp-*"))


def test_multipart_upload_and_download(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = S3Store(s3_bucket.name, s3_bucket.server.settings(), multipart_threshold=5 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    info = store.put("big.bin", src)
    assert info.size == 11 << 20
    assert info.etag is not None and info.etag.endswith("-3"), info.etag  # three parts
    store.download("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_fetch_object_and_model_prefix(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    settings = s3_bucket.server.settings()
    s3_bucket.put("data/train.jsonl", b'{"text": "hi"}\n')
    s3_bucket.put("models/tiny/config.json", b"{}")
    s3_bucket.put("models/tiny/model.safetensors", b"weights")
    s3_bucket.put("models/tiny/tokenizer/tokenizer.json", b"tok")
    s3_bucket.put("models/tiny-other/x", b"not mine")
    path = fetch(s3_bucket.uri_for("data/train.jsonl"), tmp_path / "data", settings)
    assert path == tmp_path / "data" / "train.jsonl"
    assert path.read_bytes() == b'{"text": "hi"}\n'
    model = fetch(s3_bucket.uri_for("models/tiny"), tmp_path / "model", settings)
    assert model == tmp_path / "model"
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert files == [
        ".qlora-fetch.json",
        "config.json",
        "model.safetensors",
        "tokenizer/tokenizer.json",
    ]
    # A second fetch (a restarted pod) downloads only what changed.
    before = (model / "model.safetensors").stat().st_mtime_ns
    s3_bucket.put("models/tiny/config.json", b'{"changed": true}')
    time.sleep(0.01)
    fetch(s3_bucket.uri_for("models/tiny"), model, settings)
    assert (model / "model.safetensors").stat().st_mtime_ns == before
    assert (model / "config.json").read_bytes() == b'{"changed": true}'
    with pytest.raises(StorageError, match="no object and no objects under it"):
        fetch(s3_bucket.uri_for("models/none"), tmp_path / "x", settings)


def test_traversal_keys_are_rejected_before_any_request(s3_bucket: S3Bucket) -> None:
    store = S3Store(s3_bucket.name, s3_bucket.server.settings())
    for key in ("../other-bucket/x", "/abs", "a/../../x", "a\\b", "a\x00"):
        with pytest.raises(UnsafeKeyError):
            store.put(key, b"x")
    with pytest.raises(UnsafeKeyError):
        open_store(f"s3://{s3_bucket.name}/../x", s3_bucket.server.settings())
    assert s3_bucket.keys() == []


def test_wrong_credentials_exit_5_with_a_clear_message(s3_bucket: S3Bucket) -> None:
    env = s3_bucket.server.subprocess_env(AWS_SECRET_ACCESS_KEY="wrong-secret")
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "verify", s3_bucket.uri_for("out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitCode.STORAGE, proc.stderr
    assert f"s3://{s3_bucket.name}/out/manifest.json" in proc.stderr
    assert "access denied (HTTP 403): the credentials are wrong" in proc.stderr
    assert "AWS_ACCESS_KEY_ID" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "wrong-secret" not in proc.stderr + proc.stdout


def test_unknown_access_key_and_missing_bucket(
    s3_bucket: S3Bucket,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["verify", "s3://no-such-bucket-qlora/out"]) == ExitCode.VERIFICATION_FAILED
    assert "nothing published here" in capsys.readouterr().err
    store = S3Store("no-such-bucket-qlora", s3_bucket.server.settings())
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-qlora' does not exist"):
        store.list("x/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    assert main(["verify", s3_bucket.uri]) == ExitCode.STORAGE
    assert "access denied (HTTP 403)" in capsys.readouterr().err
    with pytest.raises(StorageError, match=r"credentials rejected \(InvalidAccessKeyId\)"):
        S3Store(s3_bucket.name, s3_bucket.server.settings()).list("")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=r"credentials rejected \(SignatureDoesNotMatch\)"):
        S3Store(s3_bucket.name, s3_bucket.server.settings()).put("k", b"x")


def test_no_credentials_exit_5(
    s3_bucket: S3Bucket,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["verify", s3_bucket.uri]) == ExitCode.STORAGE
    assert "no S3 credentials found" in capsys.readouterr().err


def test_stopped_server_bounded_retries_then_exit_5(
    private_s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = private_s3_server.create_bucket()
    private_s3_server.stop()
    env = private_s3_server.subprocess_env(QLORA_STORAGE_RETRIES="3", QLORA_LOG_FORMAT="text")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "verify", f"s3://{bucket}/out"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == ExitCode.STORAGE, proc.stderr
    assert "after 3 retries" in proc.stderr and "cannot reach the S3 endpoint" in proc.stderr
    assert proc.stderr.count("retry ") == 3, proc.stderr  # each retry is logged
    assert "Traceback" not in proc.stderr
    # 3 retries with 0.5 s doubling backoff: at most 0.5 + 1 + 2 s of sleep, plus start-up.
    assert elapsed < 30, elapsed
    # With the server back, the same store works again.
    private_s3_server.start()
    private_s3_server.apply_env(monkeypatch)
    store = S3Store(bucket, private_s3_server.settings(), retry=RetryPolicy(2, base_s=0.1))
    store.put("after/restart", b"ok")
    assert store.read("after/restart") == b"ok"
