"""The model config of a GGUF file, read from its header alone (no weights, no torch).

A GGUF file starts with a header: magic ``GGUF``, a version, the tensor and key-value counts,
the key-value metadata (architecture, sizes, the tokenizer's vocabulary) and one record per
tensor (name, shape, type, offset). The planner needs only the sizes, so ``qlora plan`` on a
GGUF source reads this header and maps it to the ``config.json`` keys
:func:`runner.plan.shapes.shape_from_config` reads; the weights (the bulk of the file) are never
read and nothing is converted. Format: the GGUF specification in ggml's ``docs/gguf.md``
(versions 2 and 3, little-endian).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

from runner.errors import SpecError

MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"

# Value types of the metadata (docs/gguf.md, gguf_metadata_value_type).
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 24  # a metadata string longer than 16 MiB means a corrupt header
_MAX_COUNT = 1 << 32

# GGUF architecture name -> transformers model_type (the architectures shapes.py knows).
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def is_gguf_source(source: str) -> bool:
    """Whether ``spec.model.source`` names a GGUF file (by its suffix)."""
    return source.lower().rstrip("/").endswith(GGUF_SUFFIX)


class _Reader:
    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where = f, where

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise SpecError(f"{self.where}: the GGUF header ends early; the file is truncated")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise SpecError(f"{self.where}: a GGUF header string of {n} bytes; corrupt header")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int, *, keep_arrays: bool) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if count > _MAX_COUNT:
                raise SpecError(f"{self.where}: a GGUF array of {count} items; corrupt header")
            if not keep_arrays and item in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[item]))
                return count
            values = [self.value(item, keep_arrays=False) for _ in range(count)]
            return values if keep_arrays else count
        raise SpecError(f"{self.where}: unknown GGUF value type {kind}; corrupt header")


def read_header(f: BinaryIO, where: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The metadata and the tensor shapes of a GGUF file.

    Arrays (the tokenizer's tokens, merges, scores) are not kept: their length is stored
    instead, which is all a config needs (the vocabulary size).

    Args:
        f: The file, positioned at its start.
        where: The file's name for messages.

    Returns:
        ``(metadata, {tensor name: shape})``.

    Raises:
        SpecError: not a GGUF file, an unsupported version, or a truncated or corrupt header.
    """
    r = _Reader(f, where)
    if r.take(4) != MAGIC:
        raise SpecError(f"{where}: not a GGUF file (no 'GGUF' magic at its start)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise SpecError(f"{where}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise SpecError(f"{where}: implausible GGUF counts; corrupt header")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"), keep_arrays=False)
    tensors: dict[str, tuple[int, ...]] = {}
    for _ in range(n_tensors):
        name = r.string()
        dims = tuple(r.scalar("<Q") for _ in range(r.scalar("<I")))
        r.scalar("<I")  # ggml type
        r.scalar("<Q")  # offset
        tensors[name] = dims
    return meta, tensors


def config_from_header(
    meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]], where: str
) -> dict[str, Any]:
    """The ``config.json`` fields the planner reads, from GGUF metadata.

    Raises:
        SpecError: an architecture the planner does not know, or a missing size.
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise SpecError(
            f"{where}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )

    def need(key: str) -> int:
        value = meta.get(f"{arch}.{key}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SpecError(f"{where}: GGUF metadata '{arch}.{key}' is missing or not a size")
        return value

    heads = need("attention.head_count")
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    if not isinstance(vocab, int) or vocab <= 0:
        raise SpecError(f"{where}: GGUF header has neither '{arch}.vocab_size' nor a vocabulary")
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[str(arch)],
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv") or heads,
        "vocab_size": vocab,
        "max_position_embeddings": meta.get(f"{arch}.context_length"),
        # No separate output matrix in the file: the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    key_len = meta.get(f"{arch}.attention.key_length")
    if isinstance(key_len, int) and key_len != config["hidden_size"] // heads:
        config["head_dim"] = key_len
    return config


def gguf_config(f: BinaryIO, where: str) -> dict[str, Any]:
    """:func:`read_header` then :func:`config_from_header`."""
    meta, tensors = read_header(f, where)
    return config_from_header(meta, tensors, where)
