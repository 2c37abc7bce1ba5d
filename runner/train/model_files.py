"""Where the base model's files are on local disk, and what exactly the model is.

``spec.model.source`` is a local directory, an ``s3://`` prefix (downloaded once into the work
directory through :func:`runner.storage.fetch`) or ``hf://org/name@revision``, read from the
local Hugging Face cache only: a job never downloads from a model hub at run time. The
identity recorded in the manifest (id, revision, sha256 of ``config.json``) lets a user tell
which base an adapter belongs to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from runner.errors import RunnerError, SpecError, missing_extra
from runner.local_files import check_model_dir, is_file
from runner.plan.config_schema import parse_model_config, read_config_bytes
from runner.plan.gguf_header import GGUF_SUFFIX, is_gguf_source
from runner.plan.model_config import hf_cache_dirs, hf_snapshot_dir
from runner.spec.model import ModelSourceKind, ModelSpec
from runner.train.tokenizer_files import check_tokenizer_files, diagnose_tokenizer_failure


@dataclass(frozen=True)
class BaseModel:
    """A base model on local disk.

    Attributes:
        path: Directory with ``config.json``, weights and tokenizer files.
        source: ``spec.model.source`` as written.
        model_id: ``org/name`` for hf://, else the directory or prefix name.
        revision: The hub commit for hf://, the file's sha256 for a GGUF file, else None.
        config_sha256: sha256 of ``config.json``.
    """

    path: Path
    source: str
    model_id: str
    revision: str | None
    config_sha256: str

    def manifest_entry(self) -> dict[str, Any]:
        """The ``base_model`` block of the published manifest."""
        return {
            "source": self.source,
            "id": self.model_id,
            "revision": self.revision,
            "config_sha256": self.config_sha256,
        }


def resolve_model(
    spec: ModelSpec, fetch_dir: Callable[[str, Path], Path], cache_dir: Path | None = None
) -> BaseModel:
    """Find (or download) the base model and describe it.

    A GGUF file (local or ``s3://``) is converted once to a safetensors folder in
    ``cache_dir`` (:mod:`runner.train.gguf_convert`) and that folder is the model from then on.

    Args:
        spec: The model section of the job spec.
        fetch_dir: Downloads an ``s3://`` prefix into a directory (``runner.storage.fetch``).
        cache_dir: Where converted GGUF files are cached (default: the user's cache).

    Raises:
        SpecError: the directory, cache entry or ``config.json`` is missing (exit code 2).
    """
    revision: str | None = None
    if is_gguf_source(spec.source):
        from runner.train.gguf_convert import converted_dir

        local = (
            fetch_dir(spec.source, Path("model"))
            if spec.source_kind is ModelSourceKind.S3
            else Path(spec.source)
        )
        path, revision = converted_dir(local, cache_dir)
        model_id = local.name.removesuffix(GGUF_SUFFIX)
    elif spec.source_kind is ModelSourceKind.HF:
        repo, wanted = spec.hf_repo
        path, revision = _hf_snapshot(repo, wanted)
        model_id = repo
    elif spec.source_kind is ModelSourceKind.S3:
        path = fetch_dir(spec.source, Path("model"))
        model_id = spec.source.rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(spec.source)
        model_id = path.resolve().name
    # Every model file a library will open is a readable plain file (else exit 2 naming it).
    check_model_dir(path, "spec.model.source")
    config = path / "config.json"
    if not is_file(config, "spec.model.source"):
        raise SpecError(
            f"spec.model.source: {spec.source}: no config.json in {path}; point it at a model "
            "directory (build the tiny test model with: python -m runner.train.tiny DIR)"
        )
    # The same strict check as `qlora plan`, before transformers reads a single field of it.
    raw = read_config_bytes(config)
    parse_model_config(raw, str(config))
    return BaseModel(path, spec.source, model_id, revision, hashlib.sha256(raw).hexdigest())


def raise_model_load_error(model_dir: Path, error: Exception) -> NoReturn:
    """Re-raise a failed ``from_pretrained`` of the base model as what it is.

    With ``config.json`` already checked (:mod:`runner.plan.config_schema`), what is left to
    fail is the user's model files disagreeing with each other or naming what the library
    does not have (a ``hidden_act`` or ``rope_type`` it does not know, weights of another
    shape): exit 2, naming the directory. Out-of-memory and device errors belong to the node,
    and a missing library to the image, so those propagate unchanged.

    Raises:
        SpecError: the model files cannot be loaded (exit code 2).
        Exception: ``error`` itself when it is the machine's fault, not the files'.
    """
    text = str(error)
    machine = (
        isinstance(error, RunnerError | ImportError | MemoryError)
        or "OutOfMemory" in type(error).__name__
        or any(word in text for word in ("CUDA", "cuda", "out of memory", "NCCL", "device-side"))
    )
    if machine:
        raise error
    reason = text.strip().splitlines()[0][:300] if text.strip() else ""
    raise SpecError(
        f"spec.model.source: cannot load the model in {model_dir}: {type(error).__name__}"
        f"{': ' + reason if reason else ''}; check that config.json matches the weights and "
        "names an architecture, activation and RoPE type this transformers version knows"
    ) from error


def _hf_snapshot(repo: str, revision: str) -> tuple[Path, str]:
    found = hf_snapshot_dir(repo, revision)
    if found is not None:
        return found, found.name
    raise SpecError(
        f"spec.model.source: hf://{repo}@{revision} is not in the local Hugging Face cache "
        f"({', '.join(str(d) for d in hf_cache_dirs())}); jobs never download from a hub: "
        "pre-populate the cache, or copy the model to s3:// and use that"
    )


def load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    """The model's tokenizer, for formatting and the preflight (pad token set).

    Args:
        model_dir: The model directory.
        trust_remote_code: ``spec.model.trust_remote_code``, passed on explicitly: only a
            literal ``true`` there lets transformers import code shipped with the model.

    Raises:
        SpecError: no tokenizer files in ``model_dir``, or files that do not load, naming the
            file (exit code 2).
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise missing_extra("transformers", "train") from e
    check_tokenizer_files(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    # transformers and tokenizers report broken files as TypeError, AttributeError or a bare
    # Exception; the files are the user's input, so each becomes exit 2 naming the file.
    except Exception as e:
        raise diagnose_tokenizer_failure(model_dir, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
