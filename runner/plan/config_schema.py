"""A model's ``config.json`` checked before any library reads it, by ``plan`` and ``run`` alike.

transformers trusts ``config.json``: a layer count written as a string, a negative hidden size
or a list where an object belongs fails deep inside model construction as a ``TypeError`` (exit
1, "internal error", which the Job retries on a GPU node). The model files are the user's
input, so these are user mistakes (exit 2) and must say which field to fix. One strict pydantic
model describes the fields that decide a decoder-only model's shape and what runs; every
reader of ``config.json`` (the planner, ``qlora run``) goes through :func:`read_model_config`
or :func:`check_model_config`. Unknown fields pass (every architecture adds its own); the
fields listed here must have their real JSON type: no string for a number, no ``1`` for
``true``.

The upper bounds are sanity limits far above any released model (the largest have hidden size
~16k, ~130 layers, vocabularies of ~260k), so a typo like ``hidden_size: 40960000`` is refused
instead of allocating until the node runs out of memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import SpecError
from runner.local_files import read_file

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A real ``config.json`` is a few KiB; anything this large is not one."""

_Pos = Annotated[int, Field(gt=0)]
_Size = Annotated[int, Field(gt=0, le=1 << 17)]
_Count = Annotated[int, Field(gt=0, le=1 << 12)]
_Vocab = Annotated[int, Field(gt=0, le=1 << 24)]
_Positions = Annotated[int, Field(gt=0, le=1 << 27)]
_PosNumber = Annotated[float, Field(gt=0)]
_TokenId = int  # some configs write -1 for "none"; only the type matters

# (canonical key, older names transformers maps onto it) that a decoder-only config must give.
_REQUIRED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hidden_size", ("n_embd", "d_model")),
    ("num_hidden_layers", ("n_layer", "num_layers")),
    ("num_attention_heads", ("n_head", "num_heads")),
    ("vocab_size", ()),
)


class RopeScaling(BaseModel):
    """``rope_scaling`` / ``rope_parameters``: which RoPE variant and its factor."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    rope_type: str | None = None
    type: str | None = None
    factor: _PosNumber | None = None
    original_max_position_embeddings: _Positions | None = None


class LanguageModelConfig(BaseModel):
    """The fields of a decoder-only ``config.json`` (or its ``text_config``) the runner reads."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    model_type: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    architectures: list[str] | None = None
    hidden_size: _Size | None = None
    n_embd: _Size | None = None
    d_model: _Size | None = None
    intermediate_size: Annotated[int, Field(gt=0, le=1 << 20)] | None = None
    num_hidden_layers: _Count | None = None
    n_layer: _Count | None = None
    num_layers: _Count | None = None
    num_attention_heads: _Count | None = None
    n_head: _Count | None = None
    num_heads: _Count | None = None
    num_key_value_heads: _Count | None = None
    head_dim: _Count | None = None
    vocab_size: _Vocab | None = None
    max_position_embeddings: _Positions | None = None
    n_positions: _Positions | None = None
    sliding_window: Annotated[int, Field(ge=0)] | None = None
    rms_norm_eps: _PosNumber | None = None
    layer_norm_eps: _PosNumber | None = None
    rope_theta: _PosNumber | None = None
    rope_scaling: RopeScaling | None = None
    rope_parameters: dict[str, Any] | None = None
    initializer_range: Annotated[float, Field(ge=0)] | None = None
    attention_dropout: Annotated[float, Field(ge=0, le=1)] | None = None
    hidden_act: str | None = None
    tie_word_embeddings: bool | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    use_cache: bool | None = None
    bos_token_id: _TokenId | list[_TokenId] | None = None
    eos_token_id: _TokenId | list[_TokenId] | None = None
    pad_token_id: _TokenId | list[_TokenId] | None = None
    torch_dtype: str | None = None
    dtype: str | dict[str, Any] | None = None
    layer_types: list[str] | None = None
    quantization_config: dict[str, Any] | None = None
    auto_map: dict[str, str | list[str | None]] | None = None

    def consistency_problems(self, prefix: str) -> list[str]:
        """``field: problem`` lines for fields that are each valid but contradict each other."""
        problems = [
            f"{prefix}{key}: missing; a decoder-only model's config.json gives it (copy the "
            "config.json that came with the weights)"
            for key, aliases in _REQUIRED
            if all(getattr(self, k) is None for k in (key, *aliases))
        ]
        heads = self.num_attention_heads or self.n_head or self.num_heads
        kv = self.num_key_value_heads
        if heads and kv and heads % kv:
            problems.append(
                f"{prefix}num_key_value_heads: {kv} does not divide num_attention_heads {heads}; "
                "grouped-query attention shares each key/value head among whole query groups"
            )
        return problems


class ModelFileConfig(LanguageModelConfig):
    """A whole ``config.json``: a language model, or a wrapper with ``text_config``."""

    model_type: Annotated[str, Field(min_length=1, max_length=128)]
    text_config: LanguageModelConfig | None = None
    vision_config: dict[str, Any] | None = None


def check_model_config(config: object, where: str) -> None:
    """Refuse a ``config.json`` whose fields have the wrong type, sign or size.

    Args:
        config: The parsed JSON document.
        where: Where it came from (a path or URI), the prefix of every message.

    Raises:
        SpecError: one ``where: field: problem`` line per problem (exit code 2).
    """
    if not isinstance(config, Mapping):
        raise SpecError(
            f"{where}: must be a JSON object, got {_json_type(config)}; is this a model's "
            "config.json?"
        )
    try:
        parsed = ModelFileConfig.model_validate(config)
    except ValidationError as e:
        problems = _problems(where, e)
    else:
        lm: LanguageModelConfig = parsed.text_config or parsed
        prefix = "text_config." if parsed.text_config is not None else ""
        problems = [f"{where}: {p}" for p in lm.consistency_problems(prefix)]
    if problems:
        raise SpecError(
            f"{where}: the model's config.json is not valid ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}); fix it, or use the config.json that came "
            "with the weights",
            details=problems,
        )


def parse_model_config(raw: bytes, where: str) -> dict[str, Any]:
    """Decode, parse and check the bytes of a ``config.json``.

    Raises:
        SpecError: too large, not UTF-8, not JSON, too deeply nested, or failing
            :func:`check_model_config` (exit code 2).
    """
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError(
            f"{where}: {len(raw)} bytes is not a config.json (limit "
            f"{MAX_CONFIG_BYTES // (1024 * 1024)} MiB)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{where}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SpecError(f"{where}: not valid JSON: {e}") from e
    except RecursionError as e:  # the C parser's own depth guard (about a thousand levels)
        raise SpecError(f"{where}: nested too deeply to be a model's config.json") from e
    check_model_config(data, where)
    assert isinstance(data, dict)  # check_model_config refused every other type
    return data


def read_model_config(path: Path, where: str | None = None) -> dict[str, Any]:
    """Read and check a local ``config.json`` (see :func:`parse_model_config`).

    Raises:
        SpecError: unreadable or invalid (exit code 2).
    """
    return parse_model_config(read_config_bytes(path, where), where or str(path))


def read_config_bytes(path: Path, where: str | None = None) -> bytes:
    """The bytes of a local ``config.json``, refusing one too large to be a config.

    Raises:
        SpecError: unreadable or larger than :data:`MAX_CONFIG_BYTES` (exit code 2).
    """
    return read_file(path, where, max_bytes=MAX_CONFIG_BYTES, what="config.json")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "an object",
    "list_type": "a list",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _problems(where: str, error: ValidationError) -> list[str]:
    # One line per field: a union (an id or a list of ids) reports each member's failure, and
    # the user needs one line saying every type the field may have.
    by_field: dict[str, list[Any]] = {}
    for err in error.errors():
        loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        by_field.setdefault(".".join(loc) or "(top level)", []).append(err)
    return [_problem(where, field, errs) for field, errs in by_field.items()]


def _problem(where: str, field: str, errs: list[Any]) -> str:
    value = errs[0].get("input")
    kinds = [e["type"] for e in errs]
    if "missing" in kinds:
        return f"{where}: {field}: missing; copy the config.json that came with the weights"
    expected = list(dict.fromkeys(_EXPECTED[k] for k in kinds if k in _EXPECTED))
    if expected:
        hint = (
            "; write it without quotes"
            if isinstance(value, str) and "a string" not in expected
            else ""
        )
        got = "null" if value is None else f"{_json_type(value)} {_short(value)}"
        return f"{where}: {field}: must be {' or '.join(expected)}, got {got}{hint}"
    msg = str(errs[0]["msg"]).replace("Input should be", "must be")
    return f"{where}: {field}: {msg}, got {_short(value)}"


def _is_union_tag(part: object) -> bool:
    # pydantic names union members in error locations ("int", "list[int]", "constrained-int");
    # the user only needs the field path.
    text = str(part)
    return (
        text in {"int", "str", "float", "bool", "RopeScaling", "LanguageModelConfig"}
        or "[" in text
        or text.startswith(("constrained-", "function-"))
    )


def _short(value: object) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
