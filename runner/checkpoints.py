"""Resumable training checkpoints in object storage, committed like a published adapter.

A preempted or crashed pod loses its local disk, so every checkpoint the trainer writes
(``checkpoint-<N>/``: the LoRA adapter, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
and ``trainer_state.json`` with the step and the loss history) is copied to the same store as
``spec.output.uri``, under a prefix of its own::

    <output>/checkpoints/<training hash>/step-00000040/<files>        # uploaded, re-hashed
    <output>/checkpoints/<training hash>/step-00000040/manifest.json  # last: the commit

The commit is :func:`runner.storage.commit.commit_directory`, the same protocol as publishing,
so a kill at any moment leaves either a complete checkpoint or a prefix without a manifest,
which every reader ignores.

The *training hash* (:func:`training_hash`) is the spec hash without the fields that only say
how the same optimisation is laid out on hardware: ``training.micro_batch_size``,
``training.gradient_accumulation_steps``, ``resources`` and ``metrics``. So after an
out-of-memory re-plan (half the micro batch, double the accumulation, or a larger GPU class)
the new attempt resumes from the last checkpoint instead of starting over; the effective
batch size and the resolved precision are part of the identity and must match, as must the
data and base model fingerprints (so editing a data file in place never resumes onto other
data). On start the runner takes the newest committed checkpoint with that identity,
downloads it and checks every file's sha256; a damaged one (a file deleted or corrupted in
the store) is skipped with a warning and the next older one is tried. After a successful
publish, older checkpoints are pruned; the newest stays, so a rerun of the same spec resumes
from it instead of retraining.

No training library is imported here: the files are opaque.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import VerificationError
from runner.settings import Settings
from runner.spec.model import JobSpec
from runner.storage.commit import (
    MANIFEST_NAME,
    commit_directory,
    discard_committed,
    parse_manifest,
    restore_directory,
    utc_now,
)
from runner.storage.factory import open_store
from runner.storage.keys import join_key
from runner.storage.ports import ObjectStore

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
"""Folder under ``spec.output.uri`` that holds one folder per spec hash."""
_STEP_RE = re.compile(r"step-([0-9]{1,12})")
_KIND = "checkpoint"


def step_name(step: int) -> str:
    """``step-00000040``: zero-padded so that listing order is step order."""
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a ``step-<N>`` folder name, or None for anything else."""
    match = _STEP_RE.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint in the store.

    Attributes:
        step: The optimizer step it was taken after.
        prefix: Its key prefix (``.../checkpoints/<hash>/step-<N>``).
        uri: URI of that prefix, for messages.
    """

    step: int
    prefix: str
    uri: str


@dataclass(frozen=True)
class Restored:
    """A checkpoint downloaded and checked, ready for ``resume_from_checkpoint``.

    Attributes:
        checkpoint: Which one.
        local_dir: The directory holding its files.
        skipped: ``<uri>: <problem>`` lines for newer checkpoints that could not be used.
    """

    checkpoint: Checkpoint
    local_dir: Path
    skipped: tuple[str, ...] = ()


class CheckpointStore:
    """The checkpoints of one job (one spec hash) in one store.

    Args:
        store: The store of ``spec.output.uri``.
        root: Key prefix of this job's checkpoints (``<output>/checkpoints/<spec hash>``).
        identity: Fields written into every manifest and required to match on resume
            (:func:`checkpoint_identity`); ``training_hash`` names the folder.
    """

    def __init__(self, store: ObjectStore, root: str, identity: Mapping[str, Any]) -> None:
        self.store = store
        self.root = join_key(root)
        self.identity = dict(identity)

    @classmethod
    def open(
        cls, output_uri: str, identity: Mapping[str, Any], settings: Settings
    ) -> CheckpointStore:
        """The checkpoints under ``<output_uri>/checkpoints/<identity['training_hash']>``.

        Raises:
            UnsafeKeyError: ``output_uri`` is not an allowed, safe URI (exit code 2).
            ValueError: ``identity`` has no 64-hex-digit ``training_hash``.
        """
        digest = str(identity.get("training_hash", ""))
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("identity['training_hash'] must be 64 lowercase hex digits")
        store, prefix = open_store(output_uri, settings)
        return cls(store, join_key(prefix, CHECKPOINTS_DIR, digest), identity)

    @property
    def uri(self) -> str:
        """URI of this job's checkpoint folder."""
        return self.store.uri(self.root)

    def _prefix(self, step: int) -> str:
        return join_key(self.root, step_name(step))

    def step_uri(self, step: int) -> str:
        """URI of the checkpoint of ``step`` (committed or not)."""
        return self.store.uri(self._prefix(step))

    def save(
        self, local_dir: Path, step: int, metadata: Mapping[str, Any] | None = None
    ) -> Checkpoint:
        """Commit the trainer's checkpoint folder as step ``step``: files first, manifest last.

        A step that is already committed is left as it is (a resumed run saving the step it
        resumed from). Objects of an earlier, interrupted upload of the same step are
        deleted first so the committed prefix holds only what the manifest lists.

        Raises:
            StorageError: the store failed after its retries (exit code 5).
            VerificationError: a file read back differs; no manifest was written.
        """
        prefix = self._prefix(step)
        checkpoint = Checkpoint(step, prefix, self.store.uri(prefix))
        if self.store.head(join_key(prefix, MANIFEST_NAME)) is not None:
            log.info("checkpoint %s is already committed", checkpoint.uri)
            return checkpoint
        for leftover in self.store.list(f"{prefix}/"):
            self.store.delete(leftover.key)
        document = {
            "kind": _KIND,
            "step": step,
            "created": utc_now(),
            **dict(metadata or {}),
            **self.identity,
        }
        committed = commit_directory(self.store, prefix, local_dir, document)
        log.info(
            "checkpoint step %d committed to %s (%d files, %d bytes)",
            step,
            committed.uri,
            len(committed.files),
            committed.total_bytes,
            extra={"checkpoint_step": step, "checkpoint_uri": committed.uri},
        )
        return checkpoint

    def committed(self) -> list[Checkpoint]:
        """Every checkpoint with a manifest, newest first (files not checked yet)."""
        found: dict[int, Checkpoint] = {}
        for info in self.store.list(f"{self.root}/"):
            rest = info.key[len(self.root) + 1 :]
            folder, _, name = rest.partition("/")
            step = parse_step(folder)
            if step is not None and name == MANIFEST_NAME:
                prefix = self._prefix(step)
                found[step] = Checkpoint(step, prefix, self.store.uri(prefix))
        return [found[s] for s in sorted(found, reverse=True)]

    def _identity_problem(self, checkpoint: Checkpoint) -> str | None:
        key = join_key(checkpoint.prefix, MANIFEST_NAME)
        try:
            document, _ = parse_manifest(self.store.read(key))
        except ValueError as e:
            return f"{self.store.uri(key)}: invalid manifest: {e}"
        if document.get("kind") != _KIND or document.get("step") != checkpoint.step:
            return f"{self.store.uri(key)}: not a manifest of checkpoint step {checkpoint.step}"
        for field, wanted in self.identity.items():
            if document.get(field) != wanted:
                return (
                    f"{checkpoint.uri}: {field} differs from this run's "
                    f"({document.get(field)!r} != {wanted!r}); not resuming from it"
                )
        return None

    def restore_latest(self, dest: Path) -> Restored | None:
        """Download the newest usable checkpoint into ``dest/step-<N>``.

        Newer checkpoints that are damaged (a file missing, a size or sha256 mismatch, an
        invalid manifest) or belong to other data are skipped with a warning each.

        Returns:
            The restored checkpoint, or None when there is none to resume from.

        Raises:
            StorageError: the store is unreachable or denies access (exit code 5).
        """
        skipped: list[str] = []
        for checkpoint in self.committed():
            problem = self._identity_problem(checkpoint)
            local = dest / step_name(checkpoint.step)
            shutil.rmtree(local, ignore_errors=True)
            if problem is None:
                try:
                    restore_directory(self.store, checkpoint.prefix, local)
                except VerificationError as e:
                    problem = "; ".join(e.lines())
            if problem is not None:
                skipped.append(problem)
                shutil.rmtree(local, ignore_errors=True)
                log.warning(
                    "skipping checkpoint step %d: %s",
                    checkpoint.step,
                    problem,
                    extra={"checkpoint_uri": checkpoint.uri},
                )
                continue
            log.info(
                "resuming from checkpoint step %d (%s)",
                checkpoint.step,
                checkpoint.uri,
                extra={"checkpoint_step": checkpoint.step, "checkpoint_uri": checkpoint.uri},
            )
            return Restored(checkpoint, local, tuple(skipped))
        if skipped:
            log.warning("no usable checkpoint in %s; training from the start", self.uri)
        return None

    def prune(self, keep: int = 1) -> int:
        """Delete all but the newest ``keep`` committed checkpoints, and interrupted uploads
        older than the newest one. Call it only after a successful publish.

        Each committed checkpoint loses its manifest before its files, so an interruption
        leaves an uncommitted prefix, never a manifest pointing at deleted files.

        Returns:
            The number of objects deleted.
        """
        if keep < 1:
            raise ValueError("keep must be >= 1: the newest checkpoint is what a rerun resumes")
        committed = self.committed()
        if not committed:
            return 0
        kept = {c.step for c in committed[:keep]}
        newest = committed[0].step
        deleted = 0
        for checkpoint in committed[keep:]:
            deleted += discard_committed(self.store, checkpoint.prefix)
        for info in self.store.list(f"{self.root}/"):
            folder = info.key[len(self.root) + 1 :].partition("/")[0]
            step = parse_step(folder)
            if step is not None and step < newest and step not in kept:
                self.store.delete(info.key)
                deleted += 1
        if deleted:
            log.info("pruned %d checkpoint objects in %s (kept %s)", deleted, self.uri, kept)
        return deleted


LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "training": ("micro_batch_size", "gradient_accumulation_steps"),
    # Where it runs and on how many ranks: a checkpoint of two ranks resumes on one (the
    # effective batch, micro x accumulation x world size, is part of the identity instead).
    "resources": ("gpu_class", "priority", "gpus_per_node", "nodes", "deadline_hours"),
    "metrics": ("enabled", "port", "pushgateway_url"),
}
"""Spec fields left out of :func:`training_hash`: where and in which slices the same
optimisation runs, not what it computes."""


def training_hash(job: JobSpec) -> str:
    """The spec's sha256 without :data:`LAYOUT_FIELDS` (64 hex digits).

    Two specs with the same training hash train the same model on the same data with the same
    schedule; they may differ in micro batch, accumulation, GPU class, GPUs and nodes (the
    world size), deadline and metrics settings.
    """
    body = job.spec.model_dump(mode="json")
    for section, fields in LAYOUT_FIELDS.items():
        for name in fields:
            body.get(section, {}).pop(name, None)
    canonical = json.dumps({"name": job.metadata.name, "spec": body}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def checkpoint_identity(
    job: JobSpec,
    *,
    dataset_fingerprint: str | None,
    base_model_config_sha256: str | None,
    effective_batch_size: int,
    quant_mode: str,
    compute_dtype: str,
) -> dict[str, Any]:
    """The manifest fields that must match for a checkpoint to be resumed from.

    Args:
        job: The job spec (its :func:`training_hash` names the checkpoint folder).
        dataset_fingerprint: sha256 over the data files, as in the published manifest.
        base_model_config_sha256: sha256 of the base model's ``config.json``.
        effective_batch_size: Micro batch x accumulation as resolved for this run.
        quant_mode: Resolved precision of the base model (``4bit``, ``16bit`` ...).
        compute_dtype: Resolved compute dtype.
    """
    return {
        "training_hash": training_hash(job),
        "dataset_fingerprint": dataset_fingerprint,
        "base_model_config_sha256": base_model_config_sha256,
        "effective_batch_size": effective_batch_size,
        "quant_mode": quant_mode,
        "compute_dtype": compute_dtype,
    }
