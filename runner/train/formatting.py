"""Dataset rows → training text with the character spans that carry loss.

Each format (messages, sharegpt, alpaca, prompt-completion, text) becomes one string plus a list of
``[start, end)`` character spans: the assistant turns, the answer, or the completion.
Tokenization (:mod:`runner.train.preflight`) maps the spans onto tokens, so prompt masking is
decided on characters, independently of how a tokenizer splits them; this is what makes
completion-only loss robust where marker-search approaches (Unsloth's
``train_on_responses_only``) silently mask everything when the template differs.

Chat rows are rendered by :class:`runner.train.template_sandbox.ChatTemplate` (bounded work
and output), ShareGPT turns are mapped by :mod:`runner.train.data_formats`, and a row that
misses its format's column gets a hint naming the format and mapping that would read it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import DataError, SpecError
from runner.spec.model import DatasetFormat, DatasetSpec
from runner.train.data_formats import SHAREGPT_ROLES, reads_as_sharegpt, suggest_layout
from runner.train.dataset import Row
from runner.train.template_sandbox import ChatTemplate, TemplateSource

log = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool"})
CHAT_FORMATS = frozenset({DatasetFormat.MESSAGES, DatasetFormat.SHAREGPT})

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)

# Named chat templates for tokenizers that ship none (or for overriding theirs).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3.1": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
CHAT_TEMPLATES["llama-3"] = CHAT_TEMPLATES["llama-3.1"]


@dataclass(frozen=True)
class FormattedRow:
    """Training text and the character spans whose tokens carry loss.

    Attributes:
        where: The row's coordinates (``dataset.sources[0]: row 17``).
        text: The full training text, special tokens included as text.
        loss_spans: ``[start, end)`` character ranges that carry loss.
        add_special_tokens: Let the tokenizer add BOS etc. (False when a chat template
            already wrote them).
    """

    where: str
    text: str
    loss_spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool


def resolve_chat_template(
    spec: DatasetSpec, tokenizer: Any, model_dir: Path | None = None
) -> ChatTemplate | None:
    """The compiled chat template to render chat rows with (None for the other formats).

    The template is compiled here, before any row is read, so a syntax error stops the run
    with its line number. Rendering goes through :mod:`runner.train.template_sandbox`, never
    through the tokenizer's own renderer, so a template cannot hang or flood the preflight.

    Args:
        spec: The dataset section.
        tokenizer: The model's tokenizer (its template and special tokens).
        model_dir: The model directory, to name the file a tokenizer's template came from.

    Raises:
        SpecError: an unknown template name, chat data and no template at all, or a template
            that does not compile (exit code 2).
    """
    if spec.format not in CHAT_FORMATS:
        return None
    variables = _special_tokens(tokenizer)
    name = spec.chat_template
    if name is None:
        own = getattr(tokenizer, "chat_template", None)
        origin = _template_origin(model_dir or Path(str(getattr(tokenizer, "name_or_path", ""))))
        if isinstance(own, Mapping):  # several named templates: the default one trains
            own = own.get("default")
        if not own:
            raise SpecError(
                "dataset.chat_template: the tokenizer has no chat template; name one of "
                f"{', '.join(sorted(CHAT_TEMPLATES))}"
            )
        if not isinstance(own, str):
            raise SpecError(
                f"{origin}: the chat template must be a text, got {type(own).__name__}; fix "
                "the tokenizer files or set dataset.chat_template"
            )
        return ChatTemplate(TemplateSource(own, origin), variables)
    if "{%" in name or "{{" in name:
        return ChatTemplate(TemplateSource(name, "dataset.chat_template"), variables)
    if name not in CHAT_TEMPLATES:
        raise SpecError(
            f"dataset.chat_template: unknown template '{name}'; use one of "
            f"{', '.join(sorted(CHAT_TEMPLATES))}, or omit it to use the tokenizer's own"
        )
    return ChatTemplate(
        TemplateSource(CHAT_TEMPLATES[name], f"dataset.chat_template ('{name}')"), variables
    )


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    # What transformers passes to every template (bos_token, eos_token, ...).
    found = getattr(tokenizer, "special_tokens_map", None)
    return dict(found) if isinstance(found, Mapping) else {}


def _template_origin(model_dir: Path) -> str:
    """The file transformers took the tokenizer's chat template from, for error messages."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return str(jinja)
    if (model_dir / "chat_template.json").is_file():
        return f"{model_dir / 'chat_template.json'}: chat_template"
    return f"{model_dir / 'tokenizer_config.json'}: chat_template"


def format_rows(
    rows: Sequence[Row], spec: DatasetSpec, tokenizer: Any, chat_template: ChatTemplate | None
) -> list[FormattedRow]:
    """Format every row; the first malformed row raises.

    Raises:
        DataError: ``dataset.sources[i]: row N: <problem>`` (exit code 2).
    """
    eos = str(getattr(tokenizer, "eos_token", None) or "")
    out = []
    sharegpt = 0
    for row in rows:
        if spec.format in CHAT_FORMATS:
            if chat_template is None:
                raise SpecError("dataset.chat_template: chat data needs a chat template")
            sharegpt += reads_as_sharegpt(row.data, spec)
            text, spans = _messages(row, spec, chat_template)
            special = False
        else:
            text, spans = _plain(row, spec, eos)
            special = True
        if spec.train_on == "all":
            spans = [(0, len(text))]
        _check_encodable(row, text)
        out.append(FormattedRow(row.where, text, tuple(spans), special))
    if sharegpt and spec.format is DatasetFormat.MESSAGES:
        log.info(
            "%d rows are ShareGPT conversations (from/value turns); read as sharegpt", sharegpt
        )
    return out


def _check_encodable(row: Row, text: str) -> None:
    # JSON allows lone surrogates ("\ud800"); they are not text, and the tokenizer would fail
    # on them with a bare exception.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{row.where}: contains an unpaired surrogate (\\u{ord(text[e.start]):04x}) that "
            "is not valid Unicode text; fix the row"
        ) from e


def _field(row: Row, spec: DatasetSpec, key: str, *, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None:
        if required:
            raise _missing(row, spec, key)
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _plain(row: Row, spec: DatasetSpec, eos: str) -> tuple[str, list[tuple[int, int]]]:
    f = spec.fields
    if spec.format is DatasetFormat.TEXT:
        text = _field(row, spec, f.text)
        if not text.strip():
            raise DataError(f"{row.where}: field '{f.text}' is empty")
        return text + eos, [(0, len(text) + len(eos))]
    if spec.format is DatasetFormat.ALPACA:
        instruction = _field(row, spec, f.instruction)
        extra = _field(row, spec, f.input, required=False)
        answer = _field(row, spec, f.output)
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if extra else "",
            instruction=instruction,
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
    else:
        prompt = _field(row, spec, f.prompt)
        answer = _field(row, spec, f.completion)
    if not answer.strip():
        key = f.output if spec.format is DatasetFormat.ALPACA else f.completion
        raise DataError(f"{row.where}: field '{key}' is empty; there is nothing to learn")
    return prompt + answer + eos, [(len(prompt), len(prompt) + len(answer) + len(eos))]


def _missing(row: Row, spec: DatasetSpec, key: str) -> DataError:
    hint = suggest_layout(row.data, spec)
    columns = ", ".join(f"'{k}'" for k in list(row.data)[:8]) or "none"
    return DataError(
        f"{row.where}: missing field '{key}' (the row has {columns})"
        + (f"; {hint}" if hint else "")
    )


def _check_messages(row: Row, spec: DatasetSpec) -> list[dict[str, str]]:
    sharegpt = reads_as_sharegpt(row.data, spec)
    key = spec.fields.conversations if sharegpt else spec.fields.messages
    messages = row.data.get(key)
    if messages is None:
        raise _missing(row, spec, key)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: field '{key}' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        at = f"{row.where}: {key}[{j}]"
        if sharegpt:
            out.append(_sharegpt_turn(m, at, key))
            continue
        if not isinstance(m, Mapping):
            raise DataError(f"{at}: expected an object with 'role' and 'content'")
        if "role" not in m and "from" in m and "value" in m:
            raise DataError(
                f"{at}: has ShareGPT keys 'from'/'value' instead of 'role'/'content'; use "
                f"dataset: {{format: sharegpt, fields: {{conversations: {key}}}}}"
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role must be one of {', '.join(sorted(ROLES))}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string")
        out.append({"role": str(role), "content": content})
    return out


def _sharegpt_turn(m: object, at: str, key: str) -> dict[str, str]:
    if not isinstance(m, Mapping):
        raise DataError(f"{at}: expected a ShareGPT turn, an object with 'from' and 'value'")
    if "from" not in m and "role" in m and "content" in m:
        raise DataError(
            f"{at}: has 'role'/'content' keys, which is the messages layout; use "
            f"dataset: {{format: messages, fields: {{messages: {key}}}}}"
        )
    speaker, value = m.get("from"), m.get("value")
    if not isinstance(speaker, str) or speaker.lower() not in SHAREGPT_ROLES:
        raise DataError(f"{at}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got {speaker!r}")
    if not isinstance(value, str):
        raise DataError(f"{at}: 'value' must be a string")
    return {"role": SHAREGPT_ROLES[speaker.lower()], "content": value}


def _messages(
    row: Row, spec: DatasetSpec, template: ChatTemplate
) -> tuple[str, list[tuple[int, int]]]:
    messages = _check_messages(row, spec)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if spec.train_on == "completions" and not assistant_turns:
        raise DataError(f"{row.where}: no assistant message; there is nothing to learn")
    full = template.render(messages, add_generation_prompt=False, where=row.where)
    spans = []
    for i in assistant_turns:
        before = (
            template.render(messages[:i], add_generation_prompt=True, where=row.where) if i else ""
        )
        upto = template.render(messages[: i + 1], add_generation_prompt=False, where=row.where)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{row.where}: the chat template does not render turn {i} as a prefix of the "
                "conversation, so the answer cannot be located; set dataset.chat_template "
                "(e.g. chatml)"
            )
        spans.append((len(before), len(upto)))
    return full, spans
