"""Unit tests: safe keys, the URI allow-list, the file:// store and fetch of local paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import ExitCode, StorageError
from runner.settings import Settings
from runner.storage import (
    LocalStore,
    ObjectNotFoundError,
    UnsafeKeyError,
    check_key,
    fetch,
    join_key,
    open_store,
    parse_uri,
)
from runner.storage.local import TMP_PREFIX


@pytest.mark.parametrize(
    "key",
    ["a", "runs/20261128T101500Z-ab12cd34-x7k2/manifest.json", "a b/c-d_e.f", "ü/ñ.bin"],
    ids=["plain", "run", "spaces", "unicode"],
)
def test_safe_keys_pass(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("../etc/passwd", "'..' segment"),
        ("runs/../../x", "'..' segment"),
        ("a/..", "'..' segment"),
        ("./a", "'.' or '..'"),
        ("a//b", "empty"),
        ("/etc/passwd", "absolute"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("a\x7fb", "control character"),
        ("k" * 1025, "longer than 1024"),
        ("", "empty"),
    ],
    ids=[
        "dotdot",
        "inner-dotdot",
        "trailing-dotdot",
        "dot",
        "double-slash",
        "absolute",
        "backslash",
        "nul",
        "newline",
        "del",
        "too-long",
        "empty",
    ],
)
def test_unsafe_keys_rejected_with_exit_2(key: str, reason: str) -> None:
    with pytest.raises(UnsafeKeyError, match=reason) as info:
        check_key(key)
    assert info.value.exit_code == ExitCode.INVALID_INPUT


def test_join_key_checks_every_part() -> None:
    assert join_key("out/", "runs", "r1/", "a.bin") == "out/runs/r1/a.bin"
    assert join_key("", "a") == "a"
    with pytest.raises(UnsafeKeyError):
        join_key("out", "..", "x")
    with pytest.raises(UnsafeKeyError):
        join_key("/abs", "x")


@pytest.mark.parametrize(
    ("uri", "scheme", "root", "key"),
    [
        ("s3://adapters/support-bot", "s3", "adapters", "support-bot"),
        ("s3://adapters/a/b/", "s3", "adapters", "a/b"),
        ("s3://adapters", "s3", "adapters", ""),
        ("file:///data/out", "file", "/data/out", ""),
    ],
    ids=["s3", "s3-trailing-slash", "s3-bucket", "file"],
)
def test_parse_uri(uri: str, scheme: str, root: str, key: str) -> None:
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.root, parsed.key) == (scheme, root, key)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://host/bucket/key", "unsupported storage URI"),
        ("gs://bucket/key", "unsupported storage URI"),
        ("/plain/path", "unsupported storage URI"),
        ("s3://user:pass@bucket/key", "credentials"),
        ("s3://Bad_Bucket/key", "not a valid bucket"),
        ("s3://bucket/../other", "unsafe object key"),
        ("s3://bucket//abs", "unsafe object key"),
        ("file://../escape", "'..'"),
        ("file://", "needs a path"),
        ("s3://bucket/a\x00b", "control character"),
    ],
    ids=[
        "http",
        "gs",
        "no-scheme",
        "creds",
        "bucket",
        "dotdot",
        "abs",
        "file-dotdot",
        "empty",
        "nul",
    ],
)
def test_parse_uri_rejects(uri: str, reason: str) -> None:
    with pytest.raises(UnsafeKeyError, match=reason):
        parse_uri(uri)


def test_file_uri_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store, prefix = open_store("file://./out", Settings())
    assert isinstance(store, LocalStore)
    assert (store.root, prefix) == (tmp_path / "out", "")


def test_local_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    info = store.put("runs/r1/model.bin", src)
    assert (info.key, info.size) == ("runs/r1/model.bin", 3000)
    store.put("runs/r1/config.json", b"{}")
    store.put("runs/r10/x", b"x")
    assert store.read("runs/r1/model.bin") == src.read_bytes()
    head = store.head("runs/r1/config.json")
    assert head is not None and head.size == 2
    assert store.head("runs/r1/missing") is None
    assert [o.key for o in store.list("runs/r1/")] == ["runs/r1/config.json", "runs/r1/model.bin"]
    assert [o.key for o in store.list("runs/r1")] == [
        "runs/r1/config.json",
        "runs/r1/model.bin",
        "runs/r10/x",
    ]
    assert store.list("nothing/") == []
    dest = tmp_path / "dl" / "model.bin"
    store.download("runs/r1/model.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    store.delete("runs/r1/model.bin")
    store.delete("runs/r1/model.bin")  # missing is fine
    assert store.head("runs/r1/model.bin") is None
    assert store.uri("a/b") == f"file://{tmp_path / 'root'}/a/b"


def test_local_missing_object_is_a_storage_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ObjectNotFoundError, match=r"file://.*/nope: no such object") as info:
        store.read("nope")
    assert info.value.exit_code == ExitCode.STORAGE
    with pytest.raises(ObjectNotFoundError):
        store.download("nope", tmp_path / "x")


def test_local_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("k", b"old")
    # A source that vanishes mid-write: the old object must survive intact.
    with pytest.raises(StorageError, match="write failed"):
        store.put("k", tmp_path / "does-not-exist")
    assert store.read("k") == b"old"
    store.put("k", b"new")
    assert store.read("k") == b"new"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_local_list_skips_in_flight_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("d/a", b"a")
    (tmp_path / "d" / f"{TMP_PREFIX}half").write_bytes(b"partial")
    assert [o.key for o in store.list("d/")] == ["d/a"]


def test_local_store_refuses_symlink_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStore(root)
    with pytest.raises(StorageError, match="outside the store root"):
        store.put("link/evil", b"x")
    assert not (outside / "evil").exists()


def test_local_store_rejects_traversal_keys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("../evil", "/etc/evil", "a/../../evil"):
        with pytest.raises(UnsafeKeyError):
            store.put(key, b"x")
    assert not (tmp_path / "evil").exists()


def test_fetch_local_paths_are_returned_as_is(tmp_path: Path) -> None:
    assert fetch("data/train.jsonl", tmp_path, Settings()) == Path("data/train.jsonl")
    assert fetch(f"file://{tmp_path}/m", tmp_path / "dl", Settings()) == tmp_path / "m"
    assert not (tmp_path / "dl").exists()
    with pytest.raises(UnsafeKeyError):
        fetch("ftp://host/x", tmp_path, Settings())


def test_s3_endpoint_from_settings_then_standard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.storage.s3 import endpoint_url

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert endpoint_url(Settings()) is None  # AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert endpoint_url(Settings()) == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert endpoint_url(Settings()) == "http://s3-only:2"
    assert endpoint_url(Settings(s3_endpoint_url="http://settings:3")) == "http://settings:3"


def test_retry_backoff_is_capped_and_jittered() -> None:
    from runner.storage.s3 import RetryPolicy

    policy = RetryPolicy(5, base_s=0.5, cap_s=4.0)
    delays = [policy.delay_s(n) for n in range(6)]
    assert all(0.25 <= delays[0] <= 0.5 for _ in range(1))
    assert all(2.0 <= d <= 4.0 for d in delays[3:])  # 0.5 * 2**3 = 4 = the cap
    assert sum(policy.delay_s(n) for n in range(5)) <= 0.5 + 1 + 2 + 4 + 4


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab./\\\x00\n~ ")), max_size=24))
def test_any_accepted_key_stays_inside_the_root(key: str) -> None:
    root = Path("/srv/store")
    try:
        checked = check_key(key)
    except UnsafeKeyError:
        return
    resolved = (root / checked).resolve()
    assert resolved.is_relative_to(root.resolve()) and resolved != root.resolve()
