"""Finding a model's ``config.json`` without downloading the model.

The planner needs only the config. It looks, in order, at: a local model directory; the
``config.json`` object under an ``s3://`` prefix (one small read, not the weights); the local
Hugging Face hub cache for ``hf://org/name@revision`` (never the network); and finally the
bundled table of well-known shapes in ``runner/data/model_configs.yaml``, so that ``qlora plan``
works offline on a laptop for the common base models. A GGUF file (local or ``s3://``) is sized
from its header (:mod:`runner.plan.gguf_header`), never converted for planning.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from runner.errors import SpecError, StorageError
from runner.local_files import access_problem, check_model_dir, is_file, read_file
from runner.plan.config_schema import parse_model_config, read_model_config
from runner.plan.gguf_header import gguf_config, is_gguf_source
from runner.settings import Settings
from runner.spec import JobSpec, ModelSourceKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """A model config and where it was found.

    Attributes:
        config: The parsed ``config.json``.
        origin: Where it came from (a path, URI, or ``bundled shape <name>``).
    """

    config: Mapping[str, Any]
    origin: str


@cache
def bundled_shapes() -> dict[str, dict[str, Any]]:
    """The bundled shape table: ``{shape name: {"repos": [...], "config": {...}}}``."""
    text = resources.files("runner").joinpath("data/model_configs.yaml").read_text("utf-8")
    data = yaml.safe_load(text)
    shapes: dict[str, dict[str, Any]] = data["shapes"]
    return shapes


def bundled_config(repo: str) -> ModelConfig | None:
    """The bundled config for hub id ``repo`` (case-insensitive), or for a shape name."""
    want = repo.lower()
    for name, entry in bundled_shapes().items():
        if want == name or want in (r.lower() for r in entry["repos"]):
            return ModelConfig(entry["config"], f"bundled shape {name}")
    return None


def _read_json(path: Path, where: str) -> dict[str, Any]:
    # Every config.json the planner and the runner read gets the same strict check.
    return read_model_config(path, where)


def hf_cache_dirs() -> list[Path]:
    """Hub cache directories to search, following huggingface_hub's environment variables."""
    dirs: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    if os.environ.get("XDG_CACHE_HOME"):
        dirs.append(Path(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def hf_snapshot_dir(repo: str, revision: str) -> Path | None:
    """The snapshot directory of ``repo`` at ``revision`` in a local hub cache, if present.

    Raises:
        SpecError: a cache directory, ref or snapshot the runner may not read (exit code 2).
    """
    folder = "models--" + repo.replace("/", "--")
    for cache_dir in hf_cache_dirs():
        root = cache_dir / folder
        snapshots = root / "snapshots"
        label = f"spec.model.source: hf://{repo}@{revision}"
        try:
            if not snapshots.is_dir():
                continue
            ref = root / "refs" / revision
            commit = (
                read_file(ref, max_bytes=4096, what="ref").decode("utf-8", "replace").strip()
                if is_file(ref, label)
                else revision
            )
            candidates = sorted(p for p in snapshots.iterdir() if p.name.startswith(commit))
        except OSError as e:
            raise SpecError(f"{label}: {snapshots}: {access_problem(e, directory=True)}") from e
        for snap in candidates:
            check_model_dir(snap, label)
            if is_file(snap / "config.json", label):
                return snap
    return None


def _from_hf_cache(repo: str, revision: str) -> ModelConfig | None:
    """``config.json`` of ``repo`` at ``revision`` from a local hub cache, if present."""
    snap = hf_snapshot_dir(repo, revision)
    if snap is None:
        return None
    cfg = snap / "config.json"
    return ModelConfig(_read_json(cfg, str(cfg)), str(cfg))


def _from_s3(uri: str, settings: Settings) -> ModelConfig:
    # The storage adapter is imported here only: planning a local or hf:// model needs no boto3.
    from runner.storage import open_store

    store, key = open_store(uri, settings)
    cfg_key = f"{key.rstrip('/')}/config.json" if key else "config.json"
    raw = store.read(cfg_key)
    where = f"{uri.rstrip('/')}/config.json"
    return ModelConfig(parse_model_config(raw, where), where)


def _from_gguf(source: str, kind: ModelSourceKind, settings: Settings) -> ModelConfig:
    """The config of a GGUF model file, from its header (the weights are not converted)."""
    if kind is ModelSourceKind.S3:
        from runner.storage import open_store

        store, key = open_store(source, settings)
        with io.BytesIO(store.read(key)) as f:
            return ModelConfig(gguf_config(f, source), f"GGUF header of {source}")
    path = Path(source)
    try:
        with path.open("rb") as f:
            return ModelConfig(gguf_config(f, source), f"GGUF header of {source}")
    except OSError as e:
        raise SpecError(f"spec.model.source: {source}: cannot read: {e.strerror or e}") from e


def load_model_config(spec: JobSpec, settings: Settings) -> ModelConfig:
    """Find the config of ``spec.model.source``.

    Args:
        spec: The job spec.
        settings: Deployment settings (the S3 endpoint for ``s3://`` sources).

    Returns:
        The config and where it was found.

    Raises:
        SpecError: no config can be found, or it is unreadable (exit code 2).
        StorageError: object storage failed (exit code 5).
    """
    model = spec.spec.model
    source = model.source
    kind = model.source_kind
    if is_gguf_source(source):
        return _from_gguf(source, kind, settings)
    if kind is ModelSourceKind.S3:
        try:
            return _from_s3(source, settings)
        except StorageError as e:
            # A mirror named after its hub id (s3://models/meta-llama/Llama-3.1-8B) can still be
            # planned offline from the bundled shape; the plan says which config it used.
            tail = "/".join(source.rstrip("/").split("/")[-2:])
            bundled = bundled_config(tail)
            if bundled is None:
                raise
            log.warning("planning %s from the bundled shape: %s", source, e.message)
            return ModelConfig(
                bundled.config,
                f"{bundled.origin}; {source.rstrip('/')}/config.json was not readable "
                f"({e.message.split(': ', 1)[-1]})",
            )
    if kind is ModelSourceKind.HF:
        repo, revision = model.hf_repo
        found = _from_hf_cache(repo, revision) or bundled_config(repo)
        if found is None:
            raise SpecError(
                f"spec.model.source: no config.json for {source} in the local Hugging Face "
                f"cache ({', '.join(str(d) for d in hf_cache_dirs())}) and {repo} is not a "
                "bundled shape; download the model first, or point spec.model.source at a "
                "directory holding its config.json"
            )
        return found
    path = Path(source)
    cfg = _local_config_path(path)
    if not is_file(cfg, "spec.model.source"):
        raise SpecError(
            f"spec.model.source: {cfg} does not exist; a local model is a directory with "
            "config.json (and its weights)"
        )
    return ModelConfig(_read_json(cfg, str(cfg)), str(cfg))


def offline_model_config(spec: JobSpec) -> ModelConfig | None:
    """The model's config if it is known without any network or object storage, else None.

    Looks at a local model directory, the local Hugging Face cache and the bundled shapes (an
    ``s3://`` mirror named after its hub id finds its bundled shape). For ``qlora validate``.

    Raises:
        SpecError: a local ``config.json`` exists but is not a JSON object.
    """
    model = spec.spec.model
    if model.source_kind is ModelSourceKind.S3:
        return bundled_config("/".join(model.source.rstrip("/").split("/")[-2:]))
    if model.source_kind is ModelSourceKind.HF:
        repo, revision = model.hf_repo
        return _from_hf_cache(repo, revision) or bundled_config(repo)
    cfg = _local_config_path(Path(model.source))
    if not is_file(cfg, "spec.model.source"):
        return None
    return ModelConfig(_read_json(cfg, str(cfg)), str(cfg))


def _local_config_path(path: Path) -> Path:
    """The ``config.json`` of a local model source, after checking its directory's files.

    Raises:
        SpecError: the directory or one of its model files is not readable (exit code 2).
    """
    check_model_dir(path, "spec.model.source")
    if path.is_dir() or not path.suffix:
        return path / "config.json"
    return path
