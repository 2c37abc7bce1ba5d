"""A GGUF model file turned, once, into the safetensors folder every other part reads.

Small pretrained models are often published only as GGUF (llama.cpp's format, weights
quantized to e.g. Q4_1). transformers can load a GGUF file (dequantizing it) but refuses to
``save_pretrained`` such a model, and bitsandbytes quantizes on load from a plain checkpoint
only. So the runner converts: load the GGUF with transformers, build a fresh model from its
config without the ``quantization_config`` the GGUF loader attaches, copy the weights in with
``load_state_dict`` and save a bf16 safetensors folder with the tokenizer beside it. The
folder is cached under the file's sha256 in ``settings.model_cache_dir`` (outside the job's
work directory, so every later job on that file loads it in about a second instead of
dequantizing it again) and is written to a temporary name and renamed, so a killed conversion
never leaves a half folder that looks complete.

The GGUF weights are already quantized; the bf16 folder is exactly their dequantized values,
and that is "the 16-bit model" every later quantization error is measured against.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from runner.errors import SpecError, missing_extra

log = logging.getLogger(__name__)

DONE_MARKER = ".qlora-converted"
"""Written last into a converted folder; a folder without it is incomplete and redone."""
SAVE_DTYPE = "bfloat16"
RECIPE = "v2"
"""Part of the cache key: bumped when the conversion changes, so older folders are redone.
v2: special tokens taken from the GGUF's own ids (transformers 5.17 named <|im_start|> as the
EOS token of SmolLM2's GGUF, whose header says <|im_end|>)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qlora-runner/models`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlora-runner" / "models"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_dir(gguf_file: Path, cache_dir: Path | None = None) -> tuple[Path, str]:
    """Where ``gguf_file``'s conversion lives (converting it first if needed), and its sha256.

    Args:
        gguf_file: A local ``.gguf`` file.
        cache_dir: The cache root; default :func:`default_cache_dir`.

    Raises:
        SpecError: the file is missing or transformers cannot load it (exit code 2).
    """
    if not gguf_file.is_file():
        raise SpecError(f"spec.model.source: {gguf_file}: no such GGUF file")
    digest = file_sha256(gguf_file)
    root = cache_dir or default_cache_dir()
    dest = root / f"gguf-{RECIPE}-{digest[:32]}"
    if (dest / DONE_MARKER).is_file():
        log.info("GGUF %s: using the converted folder %s", gguf_file.name, dest)
        return dest, digest
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(gguf_file, tmp)
        (tmp / DONE_MARKER).write_text(f"{digest}  {gguf_file.name}\n", encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "GGUF %s converted to %s in %.1fs",
        gguf_file.name,
        dest,
        time.monotonic() - started,
        extra={"gguf_sha256": digest},
    )
    return dest, digest


def convert(gguf_file: Path, dest: Path) -> None:
    """Write ``gguf_file`` as a bf16 safetensors model folder (config, weights, tokenizer).

    Raises:
        SpecError: transformers cannot read the file (exit code 2).
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise missing_extra(e.name or "transformers", "train") from e
    if _missing_gguf():
        raise missing_extra("gguf", "train")
    folder, name = str(gguf_file.parent), gguf_file.name
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        # A GGUF file carries no code: conversion never imports any, whatever sits beside it.
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SpecError(f"spec.model.source: {gguf_file}: transformers cannot load it: {e}") from e
    plain = _plain_config(loaded.config.to_dict())
    config = AutoConfig.for_model(plain.pop("model_type"), **plain)
    fresh: Any = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SAVE_DTYPE))
    state = {k: v.to(getattr(torch, SAVE_DTYPE)) for k, v in loaded.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # A tied head has no tensor of its own; anything else missing is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SpecError(
            f"spec.model.source: {gguf_file}: converted weights do not match the config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    _special_tokens_from_config(tokenizer, config)
    del loaded, state
    dest.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def _special_tokens_from_config(tokenizer: Any, config: Any) -> None:
    """Name the tokenizer's BOS/EOS/PAD after the ids the GGUF header gives (in the config)."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The GGUF-loaded config without what marks it as quantized or GGUF-derived."""
    drop = ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype")
    out = {k: v for k, v in config.items() if k not in drop}
    out["dtype"] = SAVE_DTYPE
    return out


def _missing_gguf() -> bool:
    import importlib.util

    return importlib.util.find_spec("gguf") is None
