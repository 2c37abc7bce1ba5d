"""The model's tokenizer files checked and, when loading fails anyway, the culprit named.

transformers reads ``tokenizer_config.json`` without checking its types (``"eos_token": 5``
fails as a ``TypeError`` deep inside, ``"added_tokens_decoder": [...]`` as an
``AttributeError``) and the ``tokenizers`` library reports a broken ``tokenizer.json`` as a
bare ``Exception``. Those are mistakes in the user's model files, so they must exit 2 and say
which file to fix. :func:`check_tokenizer_files` checks the small files strictly before
transformers sees them; :func:`diagnose_tokenizer_failure` runs only after a load failed and
finds the file that does not parse, so the large ``tokenizer.json`` is parsed a second time
only on the error path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import SpecError
from runner.local_files import read_file

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.json",
)
"""Files transformers reads to build a fast tokenizer, small ones first."""
MAX_SMALL_FILE_BYTES = 16 * 1024 * 1024
"""Larger than this, a tokenizer file other than ``tokenizer.json`` is not one."""


class _AddedToken(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    content: str


_Token = str | _AddedToken


class _ChatTemplateEntry(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    name: str
    template: str


class TokenizerConfig(BaseModel):
    """The fields of ``tokenizer_config.json`` whose type transformers assumes."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    tokenizer_class: str | None = None
    bos_token: _Token | None = None
    eos_token: _Token | None = None
    unk_token: _Token | None = None
    pad_token: _Token | None = None
    sep_token: _Token | None = None
    cls_token: _Token | None = None
    mask_token: _Token | None = None
    additional_special_tokens: list[_Token] | None = None
    extra_special_tokens: list[_Token] | dict[str, _Token] | None = None
    added_tokens_decoder: dict[str, _AddedToken] | None = None
    model_max_length: Annotated[float, Field(gt=0)] | None = None
    chat_template: str | list[_ChatTemplateEntry] | None = None
    padding_side: str | None = None
    truncation_side: str | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    clean_up_tokenization_spaces: bool | None = None
    auto_map: dict[str, str | list[str | None]] | None = None


def check_tokenizer_files(model_dir: Path) -> None:
    """Refuse tokenizer files that are not UTF-8 JSON objects, or whose known fields have the
    wrong type, before transformers reads them.

    ``tokenizer.json`` (often tens of MiB) is left to the tokenizers library here and parsed
    only by :func:`diagnose_tokenizer_failure`, when loading failed.

    Raises:
        SpecError: ``<file>: problem`` naming the file and the field (exit code 2).
    """
    for name in TOKENIZER_FILES[:-1]:
        path = model_dir / name
        if path.is_file():
            doc = _parse(path)
            if name == "tokenizer_config.json":
                _check_config(doc, path)


def diagnose_tokenizer_failure(model_dir: Path, error: BaseException) -> SpecError:
    """The error to report after transformers failed to build the tokenizer.

    Args:
        model_dir: The model directory.
        error: What transformers or tokenizers raised.

    Returns:
        A SpecError naming the first file that does not parse, or the files and the error.
    """
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                _parse(path, limit=None if name == "tokenizer.json" else MAX_SMALL_FILE_BYTES)
            except SpecError as found:
                return found
    present = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return SpecError(
        f"spec.model.source: the tokenizer in {model_dir} could not be loaded from "
        f"{', '.join(present) or 'no tokenizer files'}: {type(error).__name__}"
        f"{': ' + reason if reason else ''}; check those files (re-save them with "
        "tokenizer.save_pretrained())"
    )


def _parse(path: Path, limit: int | None = MAX_SMALL_FILE_BYTES) -> Any:
    raw = read_file(path, max_bytes=limit, what="tokenizer file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    if path.suffix == ".jinja":
        return text
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    except (ValueError, RecursionError) as e:
        raise SpecError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: must be a JSON object, got {type(doc).__name__}")
    return doc


def _check_config(doc: dict[str, Any], path: Path) -> None:
    try:
        TokenizerConfig.model_validate(doc)
    except ValidationError as e:
        seen: dict[str, str] = {}
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
            seen.setdefault(loc, f"{path}: {loc}: {err['msg'].lower()}, got {err['input']!r:.60}")
        raise SpecError(
            f"{path}: the tokenizer config is not valid; fix the fields below or re-save it "
            "with tokenizer.save_pretrained()",
            details=list(seen.values()),
        ) from e


def _is_union_tag(part: object) -> bool:
    text = str(part)
    return (
        text in {"str", "float", "bool", "_AddedToken"}
        or "[" in text
        or text.startswith(("constrained-", "function-", "_ChatTemplateEntry"))
    )
