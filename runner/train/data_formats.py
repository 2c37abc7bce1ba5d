"""Row layouts in the wild: ShareGPT turns, and what to say when rows almost match a format.

ShareGPT (``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``) is
the most common chat dump layout; its turns are mapped onto ``{role, content}`` messages here,
so it trains like ``messages`` data without a hand-written mapping. It is read as
``format: sharegpt``, and also under the default ``format: messages`` when a row has no
``messages`` column but a ``conversations`` list of ShareGPT turns.

When a row lacks the column its format needs, :func:`suggest_layout` looks at the columns it
does have and names the format and the exact ``dataset`` mapping that would read it (alpaca
data with ``prompt``/``response``, ``question``/``answer`` pairs, chat lists under another
name), so the error says what to write in the spec instead of only what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runner.spec.model import DatasetFormat, DatasetSpec, FieldMap

SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}
"""ShareGPT ``from`` values and the chat role each becomes."""

_PROMPT_KEYS = ("instruction", "prompt", "question", "query", "problem", "human", "user", "input")
_ANSWER_KEYS = (
    "output",
    "completion",
    "response",
    "answer",
    "solution",
    "gpt",
    "assistant",
    "target",
    "chosen",
)
_TEXT_KEYS = ("text", "content", "document", "body")
_DEFAULTS = FieldMap()


def is_sharegpt_turns(value: object) -> bool:
    """Whether ``value`` is a non-empty list whose first item is a ShareGPT turn."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], Mapping)
        and "from" in value[0]
        and "value" in value[0]
    )


def is_role_messages(value: object) -> bool:
    """Whether ``value`` is a non-empty list whose first item is a ``{role, content}`` message."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], Mapping)
        and "role" in value[0]
        and "content" in value[0]
    )


def reads_as_sharegpt(data: Mapping[str, Any], spec: DatasetSpec) -> bool:
    """Whether this row is read as ShareGPT: ``format: sharegpt``, or the default messages
    layout with ShareGPT ``conversations`` in place of ``messages``."""
    if spec.format is DatasetFormat.SHAREGPT:
        return True
    return (
        spec.format is DatasetFormat.MESSAGES
        and spec.fields.messages == _DEFAULTS.messages
        and _DEFAULTS.messages not in data
        and is_sharegpt_turns(data.get(_DEFAULTS.conversations))
    )


def suggest_layout(data: Mapping[str, Any], spec: DatasetSpec) -> str | None:
    """A hint naming the format and ``dataset`` mapping that reads this row, if one does.

    Args:
        data: The row that did not match ``spec``.
        spec: The dataset section as written.

    Returns:
        ``"this row looks like ...; use dataset: {...}"``, or None when nothing fits.
    """
    for key, value in data.items():
        if is_sharegpt_turns(value):
            return _hint("ShareGPT turns", DatasetFormat.SHAREGPT, {"conversations": key})
        if is_role_messages(value):
            return _hint("chat messages", DatasetFormat.MESSAGES, {"messages": key})
    keys = [k for k, v in data.items() if isinstance(v, str)]
    answer = _first(keys, _ANSWER_KEYS)
    prompt = _first([k for k in keys if k != answer], _PROMPT_KEYS)
    if answer and prompt:
        if spec.format is DatasetFormat.ALPACA or prompt == "instruction":
            mapping = {"instruction": prompt, "output": answer}
            extra = _first([k for k in keys if k not in (prompt, answer)], ("input", "context"))
            if extra:
                mapping["input"] = extra
            return _hint("instruction/answer pairs", DatasetFormat.ALPACA, mapping)
        return _hint(
            "prompt/answer pairs",
            DatasetFormat.PROMPT_COMPLETION,
            {"prompt": prompt, "completion": answer},
        )
    text = _first(keys, _TEXT_KEYS)
    if text:
        return _hint("plain text", DatasetFormat.TEXT, {"text": text}, train_on_all=True)
    return None


def _first(keys: Sequence[str], wanted: Sequence[str]) -> str | None:
    lowered = {k.lower(): k for k in keys}
    for w in wanted:
        if w in lowered:
            return lowered[w]
    return None


def _hint(
    what: str, fmt: DatasetFormat, mapping: dict[str, str], *, train_on_all: bool = False
) -> str:
    fields = {k: v for k, v in mapping.items() if getattr(_DEFAULTS, k) != v}
    parts = [f"format: {fmt.value}"]
    if fields:
        parts.append("fields: {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}")
    if train_on_all:
        parts.append("train_on: all")
    return f"this row looks like {what}; use dataset: {{{', '.join(parts)}}}"
