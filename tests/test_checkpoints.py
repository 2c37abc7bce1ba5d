"""Checkpoints in object storage: commit, discovery, restore with fallback, pruning.

The store side of resume (:mod:`runner.checkpoints`), on ``file://`` and on a real
S3-compatible server (SeaweedFS). Checkpoint folders here hold random bytes with the names a
trainer writes; the training side is tested in ``tests/test_checkpoint_resume.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from runner.checkpoints import (
    CheckpointStore,
    checkpoint_identity,
    parse_step,
    step_name,
    training_hash,
)
from runner.cli import main
from runner.errors import ExitCode
from runner.storage import LocalStore
from runner.storage.commit import MANIFEST_NAME
from runner.storage.keys import UnsafeKeyError
from tests.fixtures.s3 import S3Bucket

SPEC_HASH = "ab" * 32
IDENTITY: dict[str, Any] = {
    "training_hash": SPEC_HASH,
    "dataset_fingerprint": "d4" * 32,
    "base_model_config_sha256": "c0" * 32,
    "effective_batch_size": 16,
    "quant_mode": "4bit",
    "compute_dtype": "bfloat16",
}
TRAINER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)


def trainer_checkpoint(root: Path, step: int) -> Path:
    """A folder shaped like ``transformers`` ``checkpoint-<step>`` (random contents)."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in TRAINER_FILES:
        (path / name).write_bytes(os.urandom(2048))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def local_store(tmp_path: Path, identity: dict[str, Any] = IDENTITY) -> CheckpointStore:
    return CheckpointStore(LocalStore(tmp_path / "store"), f"out/checkpoints/{SPEC_HASH}", identity)


@pytest.mark.parametrize(
    ("step", "name"), [(0, "step-00000000"), (40, "step-00000040"), (123456789, "step-123456789")]
)
def test_step_names_sort_by_step(step: int, name: str) -> None:
    assert step_name(step) == name
    assert parse_step(name) == step


@pytest.mark.parametrize("name", ["step-", "step-x", "checkpoint-4", "step-4/..", "../step-4"])
def test_parse_step_rejects_other_names(name: str) -> None:
    assert parse_step(name) is None


def test_save_then_restore_newest(tmp_path: Path) -> None:
    ck = local_store(tmp_path)
    for step in (2, 4, 10):
        ck.save(trainer_checkpoint(tmp_path / "trainer", step), step)
    assert [c.step for c in ck.committed()] == [10, 4, 2]
    restored = ck.restore_latest(tmp_path / "resume")
    assert restored is not None
    assert restored.checkpoint.step == 10
    assert restored.skipped == ()
    for name in TRAINER_FILES:
        assert (restored.local_dir / name).read_bytes() == (
            tmp_path / "trainer" / "checkpoint-10" / name
        ).read_bytes()
    manifest = json.loads(
        (tmp_path / "store" / restored.checkpoint.prefix / MANIFEST_NAME).read_text()
    )
    assert manifest["kind"] == "checkpoint"
    assert manifest["step"] == 10
    assert manifest["training_hash"] == SPEC_HASH


def test_no_checkpoint_means_start_fresh(tmp_path: Path) -> None:
    assert local_store(tmp_path).restore_latest(tmp_path / "resume") is None


def test_prefix_without_manifest_is_ignored(tmp_path: Path) -> None:
    ck = local_store(tmp_path)
    ck.save(trainer_checkpoint(tmp_path / "t", 2), 2)
    # An upload of step 4 that was killed before its manifest: files only.
    partial = tmp_path / "store" / ck.root / step_name(4)
    partial.mkdir(parents=True)
    (partial / "optimizer.pt").write_bytes(b"half")
    restored = ck.restore_latest(tmp_path / "resume")
    assert restored is not None and restored.checkpoint.step == 2


@pytest.mark.parametrize("damage", ["corrupt", "delete", "truncate", "manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    ck = local_store(tmp_path)
    for step in (3, 6):
        ck.save(trainer_checkpoint(tmp_path / "t", step), step)
    newest = tmp_path / "store" / ck.root / step_name(6)
    target = newest / "optimizer.pt"
    if damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    else:
        (newest / MANIFEST_NAME).write_text("{not json")
    restored = ck.restore_latest(tmp_path / "resume")
    assert restored is not None
    assert restored.checkpoint.step == 3
    assert len(restored.skipped) == 1
    assert step_name(6) in restored.skipped[0]
    assert not (tmp_path / "resume" / step_name(6)).exists()


def test_checkpoint_of_other_data_is_not_resumed(tmp_path: Path) -> None:
    old = local_store(tmp_path, {**IDENTITY, "dataset_fingerprint": "0f" * 32})
    old.save(trainer_checkpoint(tmp_path / "t", 5), 5)
    restored = local_store(tmp_path).restore_latest(tmp_path / "resume")
    assert restored is None
    other_batch = local_store(tmp_path, {**IDENTITY, "effective_batch_size": 32})
    assert other_batch.restore_latest(tmp_path / "resume") is None


def test_saving_a_committed_step_again_keeps_it(tmp_path: Path) -> None:
    ck = local_store(tmp_path)
    ck.save(trainer_checkpoint(tmp_path / "a", 4), 4)
    before = (tmp_path / "store" / ck.root / step_name(4) / MANIFEST_NAME).read_bytes()
    ck.save(trainer_checkpoint(tmp_path / "b", 4), 4)
    after = (tmp_path / "store" / ck.root / step_name(4) / MANIFEST_NAME).read_bytes()
    assert before == after


def test_interrupted_upload_of_the_same_step_is_replaced(tmp_path: Path) -> None:
    ck = local_store(tmp_path)
    stale = tmp_path / "store" / ck.root / step_name(4)
    stale.mkdir(parents=True)
    (stale / "stale-from-a-killed-run.bin").write_bytes(b"x")
    ck.save(trainer_checkpoint(tmp_path / "a", 4), 4)
    names = sorted(p.name for p in stale.iterdir())
    assert names == sorted([*TRAINER_FILES, MANIFEST_NAME])


def test_prune_keeps_newest_and_drops_leftovers(tmp_path: Path) -> None:
    ck = local_store(tmp_path)
    for step in (2, 4, 6):
        ck.save(trainer_checkpoint(tmp_path / "t", step), step)
    leftover = tmp_path / "store" / ck.root / step_name(5)
    leftover.mkdir()
    (leftover / "optimizer.pt").write_bytes(b"partial")
    deleted = ck.prune(keep=1)
    assert deleted == 2 * (len(TRAINER_FILES) + 1) + 1
    remaining = sorted(p.name for p in (tmp_path / "store" / ck.root).iterdir() if any(p.iterdir()))
    assert remaining == [step_name(6)]
    restored = ck.restore_latest(tmp_path / "resume")
    assert restored is not None and restored.checkpoint.step == 6
    with pytest.raises(ValueError, match="keep"):
        ck.prune(keep=0)


@pytest.mark.parametrize(
    "uri", ["http://bucket/out", "s3://bucket/../etc", "file:///tmp/../etc", "s3://user:pw@b/x"]
)
def test_open_refuses_unsafe_output_uris(uri: str) -> None:
    from runner.settings import Settings

    with pytest.raises(UnsafeKeyError):
        CheckpointStore.open(uri, IDENTITY, Settings())


def test_open_refuses_a_training_hash_that_is_not_a_hash(tmp_path: Path) -> None:
    from runner.settings import Settings

    with pytest.raises(ValueError, match="training_hash"):
        CheckpointStore.open(f"file://{tmp_path}", {"training_hash": "../../x"}, Settings())


TRAINING_SPEC = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: bot, labels: {team: a}}
spec:
  model: {source: /models/tiny}
  dataset: {sources: [/data/train.jsonl]}
  training: {micro_batch_size: 4, gradient_accumulation_steps: 4}
  output: {uri: file:///data/out}
"""


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("training", "micro_batch_size", 2),
        ("training", "gradient_accumulation_steps", 8),
        ("resources", "gpu_class", "80GB"),
        ("resources", "deadline_hours", 3.0),
        ("metrics", "port", 9500),
        ("metrics", "enabled", False),
    ],
)
def test_an_oom_replan_keeps_the_training_hash(section: str, field: str, value: Any) -> None:
    """Half the micro batch, double the accumulation, a larger class: same checkpoints."""
    import yaml

    from runner.spec import load_spec_text, spec_hash, validate_document

    base = load_spec_text(TRAINING_SPEC)
    doc = yaml.safe_load(TRAINING_SPEC)
    doc["spec"].setdefault(section, {})[field] = value
    changed = validate_document(doc)
    assert spec_hash(changed) != spec_hash(base)
    assert training_hash(changed) == training_hash(base)


@pytest.mark.parametrize("field", ["gpus_per_node", "nodes"])
def test_the_world_size_keeps_the_training_hash(field: str) -> None:
    """Two ranks x accumulation 2 = one rank x accumulation 4: a checkpoint of the one resumes
    on the other (the effective batch, part of the checkpoint identity, is the same)."""
    import yaml

    from runner.spec import load_spec_text, validate_document

    doc = yaml.safe_load(TRAINING_SPEC)
    doc["spec"]["resources"] = {field: 2}
    doc["spec"]["training"]["gradient_accumulation_steps"] = 2
    assert training_hash(validate_document(doc)) == training_hash(load_spec_text(TRAINING_SPEC))


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("training", "learning_rate", 1e-3),
        ("training", "seed", 1),
        ("training", "max_steps", 10),
        ("dataset", "sources", ["/data/other.jsonl"]),
        ("model", "source", "/models/other"),
        ("lora", "r", 8),
        ("quantization", "mode", "16bit"),
    ],
)
def test_a_different_training_has_another_hash(section: str, field: str, value: Any) -> None:
    import yaml

    from runner.spec import load_spec_text, validate_document

    doc = yaml.safe_load(TRAINING_SPEC)
    doc["spec"].setdefault(section, {})[field] = value
    assert training_hash(validate_document(doc)) != training_hash(load_spec_text(TRAINING_SPEC))


def test_checkpoint_identity_fields() -> None:
    from runner.spec import load_spec_text

    job = load_spec_text(TRAINING_SPEC)
    identity = checkpoint_identity(
        job,
        dataset_fingerprint="d4" * 32,
        base_model_config_sha256=None,
        effective_batch_size=16,
        quant_mode="4bit",
        compute_dtype="bfloat16",
    )
    assert identity["training_hash"] == training_hash(job)
    assert identity["effective_batch_size"] == 16


@pytest.mark.integration
def test_s3_corrupted_and_deleted_objects_caught_by_verify_and_resume(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's line: corrupted and deleted objects are caught by ``qlora verify`` and by
    resume, which falls back to the previous complete checkpoint."""
    settings = s3_bucket.server.settings()
    ck = CheckpointStore.open(f"{s3_bucket.uri}/jobs/bot", IDENTITY, settings)
    for step in (2, 4, 6):
        ck.save(trainer_checkpoint(tmp_path / "t", step), step)
    root = f"jobs/bot/checkpoints/{SPEC_HASH}"
    assert ck.uri == s3_bucket.uri_for(root)
    # Corrupt step 6 (same size, one byte flipped) and delete a file of step 4.
    key6 = f"{root}/{step_name(6)}/rng_state.pth"
    data = bytearray(s3_bucket.get(key6))
    data[0] ^= 0x01
    s3_bucket.put(key6, bytes(data))
    s3_bucket.delete(f"{root}/{step_name(4)}/scheduler.pt")

    assert (
        main(["verify", s3_bucket.uri_for(f"{root}/{step_name(6)}")])
        == ExitCode.VERIFICATION_FAILED
    )
    assert "sha256 mismatch" in capsys.readouterr().err
    assert (
        main(["verify", s3_bucket.uri_for(f"{root}/{step_name(4)}")])
        == ExitCode.VERIFICATION_FAILED
    )
    assert "scheduler.pt: missing" in capsys.readouterr().err
    assert main(["verify", s3_bucket.uri_for(f"{root}/{step_name(2)}")]) == ExitCode.OK

    restored = ck.restore_latest(tmp_path / "resume")
    assert restored is not None
    assert restored.checkpoint.step == 2
    assert len(restored.skipped) == 2
    assert "sha256 mismatch" in restored.skipped[0]
    assert "missing" in restored.skipped[1]


@pytest.mark.integration
def test_s3_prune_deletes_manifest_first(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    ck = CheckpointStore.open(s3_bucket.uri, IDENTITY, s3_bucket.server.settings())
    for step in (1, 2):
        ck.save(trainer_checkpoint(tmp_path / "t", step), step)
    ck.prune()
    keys = s3_bucket.keys(f"checkpoints/{SPEC_HASH}/")
    assert keys and all(k.startswith(f"checkpoints/{SPEC_HASH}/{step_name(2)}/") for k in keys)
    assert f"checkpoints/{SPEC_HASH}/{step_name(2)}/{MANIFEST_NAME}" in keys
